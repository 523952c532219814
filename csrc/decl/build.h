/* Facts recorded when the extension was built (defined in csrc/build_ffi.py's source). */
const char *pycriu_build_libdir(void);

/* Free the request's config_file, which criu_local_free_opts leaves (call it just before). */
void pycriu_free_config_file(criu_opts *opts);

/* Whether the request names a page server (1) or not (0): libcriu's setter returns -ENOMEM
   even when it succeeded (3.17 and 4.2 alike), so its result is read here instead. */
int pycriu_page_server_set(criu_opts *opts);

/* What this libcriu has (1) or lacks (0): see csrc/build_ffi.py. */
#define PYCRIU_HAS_EMPTY_NS ...
#define PYCRIU_HAS_SKIP_FILE_RWX_CHECK ...
#define PYCRIU_HAS_NETWORK_LOCK_SKIP ...
