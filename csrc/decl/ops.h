/* Operations. Each returns >= 0 on success (restore: the restored pid) or a negative errno;
 * CRIU's own errno is left in errno. The GIL is released around every call (cffi API mode). */
int criu_local_check(criu_opts *opts);
int criu_local_dump(criu_opts *opts);
int criu_local_pre_dump(criu_opts *opts);
int criu_local_restore(criu_opts *opts);
int criu_local_restore_child(criu_opts *opts);
int criu_local_dump_iters(criu_opts *opts, int (*more)(criu_predump_info pi));
int criu_local_get_version(criu_opts *opts);
int criu_local_check_version(criu_opts *opts, int minimum);
int criu_local_feature_check(criu_opts *opts, struct criu_feature_check *features, size_t size);

/* Helpers usable from a notify callback. */
int criu_notify_pid(criu_notify_arg_t na);
int criu_get_orphan_pts_master_fd(void);
