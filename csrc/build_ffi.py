"""cffi API-mode builder for ``pycriu._libcriu`` (named by setup.py's ``cffi_modules``).

The declarations live in ``decl/*.h``, joined in a fixed order; ``set_source`` includes the real
``criu/criu.h`` so the compiler checks every declaration against libcriu's own header.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cffi import FFI

sys.path.insert(0, str(Path(__file__).parent))
from _build import find_libcriu  # noqa: E402

DECL_DIR = Path(__file__).parent / "decl"
DECL_ORDER = ["types.h", "opts.h", "ops.h", "callbacks.h", "build.h"]

SOURCE = """
#include <sched.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <criu/criu.h>

#define PYCRIU_LIBCRIU_AT_LEAST(major, minor) \\
    (CRIU_VERSION_MAJOR > (major) || (CRIU_VERSION_MAJOR == (major) && CRIU_VERSION_MINOR >= (minor)))

#if !PYCRIU_LIBCRIU_AT_LEAST(3, 17)
#error "pycriu needs libcriu >= 3.17 (Debian 12's criu package, or scripts/provision.sh's CRIU 4.2)"
#endif

/* What libcriu 4.2 has and 3.17 (Debian 12's) lacks. An older libcriu gets stand-ins so that the
   module links; pycriu._raw reads the PYCRIU_HAS_* flags and refuses, naming the version that has
   the feature, before any stand-in could be called. Versions between 3.17 and 4.2 are treated as
   3.17 (only these two are built and tested). */
/* libcriu's struct criu_opts begins with the request's options, CriuOpts *rpc, in 3.17 as in 4.2
   (lib/c/criu.c). Through it pycriu frees the config_file that criu_local_free_opts leaves
   (neither version frees it), and, on 3.17, sets it: 3.17's CRIU reads the request's
   config_file (cr-service.c) though its libcriu has no setter for it. */
static CriuOpts *pycriu_rpc(criu_opts *opts) { return *(CriuOpts **)opts; }
static void pycriu_free_config_file(criu_opts *opts)
{ CriuOpts *rpc = pycriu_rpc(opts); free(rpc->config_file); rpc->config_file = NULL; }
static int pycriu_page_server_set(criu_opts *opts)
{ CriuOpts *rpc = pycriu_rpc(opts); return rpc->ps != NULL && rpc->ps->address != NULL; }

#if PYCRIU_LIBCRIU_AT_LEAST(4, 2)
#define PYCRIU_HAS_EMPTY_NS 1
#define PYCRIU_HAS_SKIP_FILE_RWX_CHECK 1
#define PYCRIU_HAS_NETWORK_LOCK_SKIP 1
#else
#define PYCRIU_HAS_EMPTY_NS 0
#define PYCRIU_HAS_SKIP_FILE_RWX_CHECK 0
#define PYCRIU_HAS_NETWORK_LOCK_SKIP 0
#define CRIU_NETWORK_LOCK_SKIP 3 /* 4.2's value; never sent to an older CRIU */
static int criu_local_set_config_file(criu_opts *opts, const char *path)
{   /* as 4.2's does */
    char *copy = strdup(path);
    if (!copy)
        return -ENOMEM;
    free(pycriu_rpc(opts)->config_file);
    pycriu_rpc(opts)->config_file = copy;
    return 0;
}
static void criu_local_set_empty_ns(criu_opts *opts, int namespaces) { (void)opts; (void)namespaces; }
static void criu_local_set_skip_file_rwx_check(criu_opts *opts, bool skip) { (void)opts; (void)skip; }
#endif
"""

lib = find_libcriu()
# Where libcriu was found: the criu binary of the same install is looked up next to it at run time.
libdir = lib.library_dirs[0] if lib.library_dirs else ""
BUILD_FACTS = f"""
static const char *pycriu_build_libdir(void) {{ return {json.dumps(libdir)}; }}
"""

ffi = FFI()
ffi.cdef("\n".join((DECL_DIR / name).read_text() for name in DECL_ORDER))
ffi.set_source(
    "pycriu._libcriu",
    SOURCE + BUILD_FACTS,
    libraries=["criu"],
    include_dirs=lib.include_dirs,
    library_dirs=lib.library_dirs,
    runtime_library_dirs=lib.library_dirs,
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
