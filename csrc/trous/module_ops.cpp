// The Python extension module trous._C. Loading it registers every op (TORCH_LIBRARY in ops.cpp).
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  // Read by `python -m trous.info` to tell what this binary holds (not what the wheel claims).
  module.def("build_info", []() {
    pybind11::dict info;
#ifdef TROUS_WITH_CUDA
    info["cuda_kernels"] = true;
#else
    info["cuda_kernels"] = false;
#endif
    info["torch_version_at_build"] = TORCH_VERSION;
    return info;
  });
}
