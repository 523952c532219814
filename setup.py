"""Build glue: the compiled binding is produced by cffi from csrc/build_ffi.py; CRIU's image
schemas (pycriu/images/_generated) by csrc/build_images.py from the CRIU source; the hot loops
of reading memory from images (pycriu/images/_scan.pyx) by Cython."""

import subprocess
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

_here = Path(__file__).resolve().parent
if subprocess.run([sys.executable, str(_here / "csrc" / "build_images.py")]).returncode:
    raise SystemExit("pycriu: CRIU's image schemas could not be built (see the message above)")

_scan = Extension("pycriu.images._scan", ["pycriu/images/_scan.pyx"], extra_compile_args=["-O3"])

setup(cffi_modules=["csrc/build_ffi.py:ffi"],
      ext_modules=cythonize([_scan], compiler_directives={"language_level": "3"}, quiet=True))
