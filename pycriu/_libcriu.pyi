# Stub of the cffi-compiled extension built from csrc/ (declarations in csrc/decl/*.h).
# Only pycriu._raw uses it.
from typing import Any

ffi: Any
lib: Any
