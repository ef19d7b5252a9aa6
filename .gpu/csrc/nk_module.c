/* The Python extension-module shell of the native backend. The kernels are called through ctypes
 * (rwkv_edge/backends/native.py loads this same shared object with ctypes.CDLL): setuptools builds
 * and names the library for the platform, and this empty module is what makes it an extension. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef nk_def = {PyModuleDef_HEAD_INIT, "_nk", "rwkv-edge native CPU kernels (use via ctypes)",
                                    -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__nk(void) { return PyModule_Create(&nk_def); }
