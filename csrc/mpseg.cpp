// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// The mpseg operator library: schemas of every op (kernels register per backend in <op>/cpu and <op>/cuda), plus an
// empty Python module so that `import mpseg._C` loads this shared library and thereby runs the registrations.
// Autograd, fake-tensor and autocast rules are registered in Python (mpseg/ops/ms_deform_attn.py,
// mpseg/ops/point_sampling.py).
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#ifdef MPSEG_WITH_CUDA
namespace mpseg {
std::string cuda_build_info();  // defined in ms_deform_attn/cuda/ms_deform_attn_kernel.cu
}
#endif

namespace mpseg {
namespace {


// JSON describing how this library was built; read by mpseg._extension.build_info() and `python -m mpseg.info`.
std::string build_info() {
  std::ostringstream out;
  out << "{\"torch_version\": \"" << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "." << TORCH_VERSION_PATCH
      << "\"";
#ifdef MPSEG_WITH_CUDA
  out << ", \"with_cuda\": true, " << cuda_build_info();
#else
  out << ", \"with_cuda\": false, \"cuda_version\": null, \"cuda_archs\": []";
#endif
#ifdef _OPENMP
  out << ", \"openmp\": true, \"openmp_version\": " << _OPENMP;
#else
  out << ", \"openmp\": false, \"openmp_version\": null";
#endif
  out << ", \"num_threads\": " << at::get_num_threads();
#ifdef MPSEG_SANITIZE
  out << ", \"sanitize\": true";
#else
  out << ", \"sanitize\": false";
#endif
  out << ", \"compiler\": \"" <<
#if defined(__clang__)
      "clang " << __clang_major__ << "." << __clang_minor__
#elif defined(__GNUC__)
      "gcc " << __GNUC__ << "." << __GNUC_MINOR__
#else
      "unknown"
#endif
      << "\"}";
  return out.str();
}

}  // namespace
}  // namespace mpseg

TORCH_LIBRARY(mpseg, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights) -> Tensor");
  // Private: the backward of ms_deform_attn, returning (grad_value, grad_sampling_locations, grad_attention_weights).
  m.def(
      "_ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
  // Private kernels of mpseg.sample_masks_at_points and mpseg.sample_uncertain_points (point_sampling/): bilinear
  // values of masks at points (no gradient), and the k most uncertain (-|logit|) of S candidate points per mask.
  m.def(
      "_sample_masks_at_points(Tensor masks, Tensor coords, Tensor? mask_index, SymInt canvas_h, SymInt canvas_w) "
      "-> Tensor");
  m.def("_select_uncertain_points(Tensor logits, Tensor coords, SymInt k) -> Tensor");
  m.def("_build_info() -> str", &mpseg::build_info);
}

// `import mpseg._C` needs a module init function; the module itself is empty (the ops live in torch.ops.mpseg).
static PyModuleDef mpseg_module = {PyModuleDef_HEAD_INIT, "_C", "mpseg operator library (see torch.ops.mpseg)", -1,
                                   nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mpseg_module); }
