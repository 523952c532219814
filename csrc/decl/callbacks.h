/* Python callbacks handed to libcriu (pycriu/_raw.py explains the round trip). */
extern "Python" int _pycriu_notify_cb(char *action, criu_notify_arg_t na);
extern "Python" int _pycriu_more_cb(criu_predump_info pi);
