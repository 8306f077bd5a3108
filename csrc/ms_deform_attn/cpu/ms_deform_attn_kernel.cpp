// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// CPU kernels of mpseg::ms_deform_attn. Arithmetic per sample comes from ../sampling.h (shared with CUDA); the loops
// are ms_deform_attn_loops.h, compiled twice here: for the compiler's default target (16-byte vectors) and, on x86-64,
// for AVX2 + FMA + F16C (32-byte vectors), picked at run time when the CPU has them and torch's own CPU capability
// (ATEN_CPU_CAPABILITY) is AVX2 or better. A wheel built here therefore still runs on a CPU without AVX2, and
// `ATEN_CPU_CAPABILITY=default` forces the baseline loops (the tests use it to cover both). No AVX-512 variant: the
// AVX2 loops run unchanged on AVX-512 CPUs. Reduced precision (bf16/fp16) accumulates in float (at::opmath_type).
//
// Parallelism and determinism: the forward splits (b, m, q) tasks, each writing its own output row. The backward uses
// no atomics and no thread-count-dependent reduction: its units (batch b, head m, level l) own disjoint rows of
// grad_value and the gradients of their own samples, and visit their samples in a fixed order, so gradients are
// bit-identical across runs and thread counts. Every unit handles Q * P samples, so the split is balanced.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/sampling.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define MPSEG_MSDA_AVX2 1
#include <immintrin.h>
#else
#define MPSEG_MSDA_AVX2 0
#endif

#if defined(__GNUC__)
// Vector types wider than the default target's registers in signatures: an ABI note, irrelevant here (internal
// linkage, every such call stays inside one target).
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace mpseg {
namespace msda {
namespace {

// One call's inputs and the backward's outputs, as raw pointers (shared by both variants of the loops).
template <typename scalar_t>
struct Problem {
  const scalar_t* value;
  const int64_t* shapes;
  const int64_t* starts;
  const scalar_t* locations;
  const scalar_t* weights;
  Sizes n;
};

template <typename scalar_t>
struct Gradients {
  const scalar_t* grad_output;
  scalar_t* grad_value;
  at::opmath_type<scalar_t>* grad_value_acc;  // == grad_value for float/double; a float buffer for bf16/fp16
  scalar_t* grad_locations;
  scalar_t* grad_weights;
};

namespace baseline {
constexpr int kVectorBytes = 16;
#define MPSEG_MSDA_F16C 0
#include "ms_deform_attn/cpu/ms_deform_attn_loops.h"
#undef MPSEG_MSDA_F16C
}  // namespace baseline

#if MPSEG_MSDA_AVX2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {
constexpr int kVectorBytes = 32;
#define MPSEG_MSDA_F16C 1
#include "ms_deform_attn/cpu/ms_deform_attn_loops.h"
#undef MPSEG_MSDA_F16C
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

// Whether the AVX2 loops run: decided once, from the CPU (cpuid, including the OS's support of the AVX registers) and
// torch's CPU capability, so that ATEN_CPU_CAPABILITY=default turns them off for mpseg as it does for torch.
bool use_avx2() {
#if MPSEG_MSDA_AVX2
  static const bool value = [] {
    __builtin_cpu_init();
    const std::string capability = at::get_cpu_capability();
    const bool torch_allows = capability.find("AVX2") != std::string::npos ||
                              capability.find("AVX512") != std::string::npos;
    return torch_allows && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return value;
#else
  return false;
#endif
}

template <typename scalar_t>
void forward_kernel(const Problem<scalar_t>& pb, scalar_t* output) {
  const Sizes& n = pb.n;
  const int64_t samples = n.levels * n.points;
  // About 32k multiply-adds per chunk: enough to amortise a chunk, fine enough to balance.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, 4 * samples * n.channels));
  at::parallel_for(0, n.batch * n.heads * n.queries, grain, [&](int64_t begin, int64_t end) {
#if MPSEG_MSDA_AVX2
    if (use_avx2()) {
      avx2::forward_tasks<scalar_t>(pb, output, begin, end);
      return;
    }
#endif
    baseline::forward_tasks<scalar_t>(pb, output, begin, end);
  });
}

template <typename scalar_t>
void backward_kernel(const Problem<scalar_t>& pb, const Gradients<scalar_t>& gr) {
  const Sizes& n = pb.n;
  at::parallel_for(0, n.batch * n.heads * n.levels, 1, [&](int64_t begin, int64_t end) {
#if MPSEG_MSDA_AVX2
    if (use_avx2()) {
      avx2::backward_units<scalar_t>(pb, gr, begin, end);
      return;
    }
#endif
    baseline::backward_units<scalar_t>(pb, gr, begin, end);
  });
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Sizes n = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  check_levels_host(shapes, starts, n.rows);
  at::Tensor output = at::empty({n.batch, n.queries, n.heads * n.channels}, value.options());  // fully written
  if (output.numel() == 0) return output;
  const at::Tensor v = value.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor w = attention_weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const Problem<scalar_t> pb{v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                               starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(),
                               w.const_data_ptr<scalar_t>(), n};
    forward_kernel<scalar_t>(pb, output.mutable_data_ptr<scalar_t>());
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_output, const at::Tensor& value,
                                                            const at::Tensor& spatial_shapes,
                                                            const at::Tensor& level_start_index,
                                                            const at::Tensor& sampling_locations,
                                                            const at::Tensor& attention_weights) {
  const Sizes n =
      check_backward_inputs(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  check_levels_host(shapes, starts, n.rows);
  if (n.batch * n.queries * n.heads * n.levels * n.points == 0 || value.numel() == 0) {
    return {at::zeros_like(value, at::MemoryFormat::Contiguous),
            at::zeros_like(sampling_locations, at::MemoryFormat::Contiguous),
            at::zeros_like(attention_weights, at::MemoryFormat::Contiguous)};
  }
  // Not zeroed here: the units zero their own rows of grad_value and write every sample's gradients (the levels tile
  // the S rows exactly, checked above, and every sample belongs to one unit).
  at::Tensor grad_value = at::empty_like(value, at::MemoryFormat::Contiguous);
  at::Tensor grad_locations = at::empty_like(sampling_locations, at::MemoryFormat::Contiguous);
  at::Tensor grad_weights = at::empty_like(attention_weights, at::MemoryFormat::Contiguous);
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor v = value.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor w = attention_weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const bool reduced = !std::is_same_v<opmath_t, scalar_t>;
    at::Tensor acc = reduced ? at::empty(value.sizes(), value.options().dtype(c10::CppTypeToScalarType<opmath_t>()))
                             : grad_value;
    const Problem<scalar_t> pb{v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                               starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(),
                               w.const_data_ptr<scalar_t>(), n};
    const Gradients<scalar_t> gr{g.const_data_ptr<scalar_t>(), grad_value.mutable_data_ptr<scalar_t>(),
                                 acc.mutable_data_ptr<opmath_t>(), grad_locations.mutable_data_ptr<scalar_t>(),
                                 grad_weights.mutable_data_ptr<scalar_t>()};
    backward_kernel<scalar_t>(pb, gr);
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(mpseg, CPU, m) {
  m.impl("ms_deform_attn", &forward_cpu);
  m.impl("_ms_deform_attn_backward", &backward_cpu);
}

}  // namespace msda
}  // namespace mpseg
