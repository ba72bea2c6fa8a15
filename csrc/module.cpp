// The Python module `ville_kernels._C`. Importing it runs the TORCH_LIBRARY_IMPL registrations of the CPU kernels
// for the ops whose schemas kernels/ville_kernels/library.py defines; kernels/ville_kernels/native.py imports it.
// `torch_version` names the torch it was compiled against: native.py refuses the kernels when the running torch
// differs (the C++ ABI is not stable across versions).
#include <Python.h>

#ifndef VILLE_TORCH_VERSION
#define VILLE_TORCH_VERSION "unknown"
#endif

static struct PyModuleDef ville_c_module = {PyModuleDef_HEAD_INIT, "_C", "ville_kernels native CPU kernels", -1,
                                            nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&ville_c_module);
  if (module != nullptr && PyModule_AddStringConstant(module, "torch_version", VILLE_TORCH_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
