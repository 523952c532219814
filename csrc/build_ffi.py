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
#include <criu/criu.h>

#if CRIU_VERSION_MAJOR < 4 || (CRIU_VERSION_MAJOR == 4 && CRIU_VERSION_MINOR < 2)
#error "pycriu needs libcriu >= 4.2 (criu_local_set_config_file); run scripts/provision.sh"
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
