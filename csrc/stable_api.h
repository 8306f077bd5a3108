// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// What every kernel file needs from PyTorch's stable ABI, in one place. The extension includes only
// torch/csrc/stable/* and torch/headeronly/* and is compiled with TORCH_TARGET_VERSION (setup.py / _build_config.py),
// so the binary calls only C shims (aoti_torch_*, torch_*) that every torch from that version on provides: one build
// loads on every newer torch, and no libtorch C++ symbol is linked.
//
// Here: the error macro (messages exactly as TORCH_CHECK printed them, without STD_TORCH_CHECK's function/file
// prefix), printing of shapes, dtypes and devices as ATen prints them, and the accumulation type of reduced precision.
#pragma once

#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>

#include <cstdint>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace mpseg {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using Sizes64 = torch::headeronly::IntHeaderOnlyArrayRef;

// Raises std::runtime_error (RuntimeError in Python) with the arguments streamed together.
template <typename... Args>
[[noreturn]] inline void fail(const Args&... args) {
  std::ostringstream out;
  ((out << args), ...);
  throw std::runtime_error(out.str());
}

#define MPSEG_CHECK(cond, ...)          \
  do {                                  \
    if (C10_UNLIKELY(!(cond))) {        \
      ::mpseg::fail(__VA_ARGS__);       \
    }                                   \
  } while (false)

// A shape as ATen prints an IntArrayRef: [2, 3, 4].
struct Shape {
  Sizes64 sizes;
};

inline std::ostream& operator<<(std::ostream& out, const Shape& shape) {
  out << "[";
  for (size_t i = 0; i < shape.sizes.size(); ++i) out << (i ? ", " : "") << shape.sizes[i];
  return out << "]";
}

inline Shape shape_of(const Tensor& t) { return Shape{t.sizes()}; }

// A device as c10::Device prints it: cpu, cuda:0, meta.
struct DeviceName {
  torch::headeronly::DeviceType type;
  int index;  // -1: none
};

inline DeviceName device_name(const torch::stable::Device& device) {
  return DeviceName{device.type(), device.has_index() ? static_cast<int>(device.index()) : -1};
}

inline std::ostream& operator<<(std::ostream& out, const DeviceName& d) {
  using torch::headeronly::DeviceType;
  switch (d.type) {
    case DeviceType::CPU: out << "cpu"; break;
    case DeviceType::CUDA: out << "cuda"; break;
    case DeviceType::Meta: out << "meta"; break;
    case DeviceType::MPS: out << "mps"; break;
    case DeviceType::XPU: out << "xpu"; break;
    case DeviceType::HIP: out << "hip"; break;
    case DeviceType::PrivateUse1: out << "privateuseone"; break;
    default: out << "device type " << static_cast<int>(d.type); break;
  }
  if (d.index >= 0) out << ":" << d.index;
  return out;
}

inline DeviceName device_of(const Tensor& t) { return device_name(t.device()); }

inline bool same_device(const Tensor& a, const Tensor& b) { return a.device() == b.device(); }

inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half || t == ScalarType::BFloat16 ||
         t == ScalarType::Float8_e5m2 || t == ScalarType::Float8_e4m3fn || t == ScalarType::Float8_e5m2fnuz ||
         t == ScalarType::Float8_e4m3fnuz || t == ScalarType::Float8_e8m0fnu;
}

inline bool is_integral(ScalarType t) {  // without bool, as at::isIntegralType(t, false)
  return t == ScalarType::Byte || t == ScalarType::Char || t == ScalarType::Short || t == ScalarType::Int ||
         t == ScalarType::Long || t == ScalarType::UInt16 || t == ScalarType::UInt32 || t == ScalarType::UInt64;
}

// Accumulation type (at::opmath_type): float for half and bfloat16, the type itself otherwise.
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<torch::headeronly::Half> {
  using type = float;
};
template <>
struct OpMath<torch::headeronly::BFloat16> {
  using type = float;
};
template <typename T>
using acc_type = typename OpMath<T>::type;

template <typename T>
constexpr ScalarType scalar_type_of() {
  return torch::headeronly::CppTypeToScalarType<T>::value;
}

// A zero-filled contiguous tensor of `sizes` with like's device and the given dtype.
inline Tensor zeros(const Tensor& like, Sizes64 sizes, ScalarType dtype) {
  return torch::stable::new_zeros(like, sizes, dtype);
}

inline Tensor zeros_like(const Tensor& like) { return zeros(like, like.sizes(), like.scalar_type()); }

inline Tensor empty(const Tensor& like, Sizes64 sizes, ScalarType dtype) {
  return torch::stable::new_empty(like, sizes, dtype);
}

}  // namespace mpseg
