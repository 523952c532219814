/* Facts recorded when the extension was built (defined in csrc/build_ffi.py's source). */
const char *pycriu_build_libdir(void);
