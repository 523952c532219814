"""Build glue: the compiled binding is produced by cffi from csrc/build_ffi.py; CRIU's image
schemas (pycriu/images/_generated) by csrc/build_images.py from the CRIU source."""

import subprocess
import sys
from pathlib import Path

from setuptools import setup

_here = Path(__file__).resolve().parent
if subprocess.run([sys.executable, str(_here / "csrc" / "build_images.py")]).returncode:
    raise SystemExit("pycriu: CRIU's image schemas could not be built (see the message above)")

setup(cffi_modules=["csrc/build_ffi.py:ffi"])
