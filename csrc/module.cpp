// The Python module disseg_kernels._C. The kernels register themselves as torch
// operators (TORCH_LIBRARY_FRAGMENT(disseg, ...) in each csrc/<family>.cpp); importing
// this module is what loads them. It defines no Python functions of its own.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "disseg-kernels compiled operators (torch.ops.disseg)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
