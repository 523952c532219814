"""Build glue: the compiled binding is produced by cffi from csrc/build_ffi.py."""

from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffi"])
