// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// The mpseg operator library: schemas of every op (kernels register per backend in <op>/cpu and <op>/cuda), plus a
// Python module so that `import mpseg._C` loads this shared library and thereby runs the registrations. Its one
// function, build_info(), says how the library was built. Autograd, fake-tensor and autocast rules are registered in
// Python (mpseg/ops/ms_deform_attn.py, mpseg/ops/point_sampling.py).
//
// Stable ABI: only torch/csrc/stable and torch/headeronly are included, and Python's limited API (Py_LIMITED_API, set
// by the build) is used, so the one binary loads on every torch >= the target version and every CPython >= 3.10.
#include <Python.h>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/version.h>
#include <torch/headeronly/version.h>

#include <sstream>
#include <string>

#ifdef MPSEG_WITH_CUDA
namespace mpseg {
std::string cuda_build_info();  // defined in ms_deform_attn/cuda/ms_deform_attn_kernel.cu
}
#endif
namespace mpseg::msda::avx2 {
bool enabled();  // defined in ms_deform_attn/cpu/ms_deform_attn_avx2.cpp
}

namespace mpseg {
namespace {


// JSON describing how this library was built; read by mpseg._extension.build_info() and `python -m mpseg.info`.
std::string build_info() {
  std::ostringstream out;
  out << "{\"torch_version\": \"" << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "." << TORCH_VERSION_PATCH
      << "\"";
#ifdef TORCH_TARGET_VERSION
  // The oldest torch whose stable ABI this binary needs (major.minor of TORCH_TARGET_VERSION).
  out << ", \"stable_abi_target\": \"" << ((TORCH_TARGET_VERSION >> 56) & 0xff) << "."
      << ((TORCH_TARGET_VERSION >> 48) & 0xff) << "\"";
#else
  out << ", \"stable_abi_target\": null";
#endif
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
  out << ", \"num_threads\": " << torch::stable::get_num_threads();
  // Which copy of the CPU loops of ms_deform_attn runs now (the CPU's instruction set and MPSEG_CPU_KERNEL).
  out << ", \"cpu_kernel\": \"" << (msda::avx2::enabled() ? "avx2" : "generic") << "\"";
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

STABLE_TORCH_LIBRARY(mpseg, m) {
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
}

// The Python module: the ops live in torch.ops.mpseg; the module has build_info() -> str (JSON). Its name is
// TORCH_EXTENSION_NAME, which torch's build helpers define: _C when built by setup.py (mpseg._C), the just-in-time
// build's own name otherwise.
namespace {

PyObject* py_build_info(PyObject* /*self*/, PyObject* /*unused*/) {
  try {
    return PyUnicode_FromString(mpseg::build_info().c_str());
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

PyMethodDef mpseg_methods[] = {
    {"build_info", py_build_info, METH_NOARGS, "JSON describing how this library was built."},
    {nullptr, nullptr, 0, nullptr},
};

#define MPSEG_STR_(x) #x
#define MPSEG_STR(x) MPSEG_STR_(x)
#define MPSEG_CONCAT_(a, b) a##b
#define MPSEG_CONCAT(a, b) MPSEG_CONCAT_(a, b)

PyModuleDef mpseg_module = {PyModuleDef_HEAD_INIT, MPSEG_STR(TORCH_EXTENSION_NAME),
                            "mpseg operator library (see torch.ops.mpseg)", -1, mpseg_methods};

}  // namespace

PyMODINIT_FUNC MPSEG_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&mpseg_module); }
