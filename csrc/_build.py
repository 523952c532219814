"""Find libcriu for the build, without importing pycriu.

Order: ``PYCRIU_LIBCRIU_PREFIX`` (a CRIU install prefix such as ``/usr/local``), then pkg-config's
``criu`` module (``PKG_CONFIG_PATH`` is honoured), then ``/usr/local``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LibcriuBuild:
    include_dirs: list[str] = field(default_factory=list)
    library_dirs: list[str] = field(default_factory=list)
    version: str | None = None


def _pkg_config(*args: str) -> str | None:
    exe = shutil.which("pkg-config") or shutil.which("pkgconf")
    if exe is None:
        return None
    proc = subprocess.run([exe, *args, "criu"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _from_prefix(prefix: Path) -> LibcriuBuild:
    libs = [p for p in sorted(prefix.glob("lib*/**/libcriu.so")) + sorted(prefix.glob("lib*/libcriu.so"))]
    return LibcriuBuild(
        include_dirs=[str(prefix / "include" / "criu"), str(prefix / "include")],
        library_dirs=sorted({str(p.parent) for p in libs}),
    )


def find_libcriu() -> LibcriuBuild:
    prefix = os.environ.get("PYCRIU_LIBCRIU_PREFIX")
    if prefix:
        return _from_prefix(Path(prefix))
    cflags = _pkg_config("--cflags-only-I")
    libdirs = _pkg_config("--libs-only-L")
    if cflags is not None and libdirs is not None:
        inc = [f[2:] for f in cflags.split() if f.startswith("-I")]
        # criu.h includes "rpc.pb-c.h" and "version.h" from its own directory.
        inc = inc + [str(Path(i).parent) for i in inc]
        return LibcriuBuild(
            include_dirs=inc,
            library_dirs=[f[2:] for f in libdirs.split() if f.startswith("-L")],
            version=_pkg_config("--modversion"),
        )
    return _from_prefix(Path("/usr/local"))
