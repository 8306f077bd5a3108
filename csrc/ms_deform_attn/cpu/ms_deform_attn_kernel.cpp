// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// CPU kernels of mpseg::ms_deform_attn. Arithmetic per sample comes from ../sampling.h (shared with CUDA); the loops
// are in loops.h, compiled twice: for the build's baseline instruction set and, on x86-64 with GCC, for AVX2 + FMA +
// F16C. The AVX2 copy is chosen at run time when the CPU has those extensions (checked once), unless the environment
// variable MPSEG_CPU_KERNEL=generic asks for the baseline copy (tests run both). Reduced precision (bf16/fp16)
// accumulates in float (acc_type, as ATen's opmath_type).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/core/Dispatch_v2.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/sampling.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MPSEG_AVX2_DISPATCH 1
#include <immintrin.h>
#else
#define MPSEG_AVX2_DISPATCH 0
#endif

namespace mpseg {
namespace msda {
namespace {

// The loops for the baseline instruction set.
namespace generic {
#define MPSEG_LOOPS_AVX2 0
#include "ms_deform_attn/cpu/loops.h"
#undef MPSEG_LOOPS_AVX2
}  // namespace generic

#if MPSEG_AVX2_DISPATCH
// The same loops for AVX2 + FMA + F16C (x86-64 CPUs since 2013-2015). GCC applies the target to every function defined
// in the region, lambdas included; the inline helpers of sampling.h are inlined into them.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define MPSEG_LOOPS_AVX2 1
#include "ms_deform_attn/cpu/loops.h"
#undef MPSEG_LOOPS_AVX2
}  // namespace avx2
#pragma GCC pop_options
#endif

// Whether to run the AVX2 copy of the loops: the CPU has AVX2, FMA and F16C (detected once), and the environment does
// not force the baseline copy (MPSEG_CPU_KERNEL=generic, read at every call so that tests can switch it).
bool use_avx2() {
#if MPSEG_AVX2_DISPATCH
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  if (!supported) return false;
  const char* forced = std::getenv("MPSEG_CPU_KERNEL");
  return forced == nullptr || std::strcmp(forced, "generic") != 0;
#else
  return false;
#endif
}

// Which copy each pass runs, as measured (docs/benchmarks.rst): the AVX2 forward is faster for every dtype; the AVX2
// backward only for float16 (F16C widening instead of a software conversion), while for float32 and bfloat16 it
// measured 4-13% slower than the baseline copy, so those keep the baseline backward.
template <typename scalar_t>
constexpr bool kAvx2Backward = std::is_same_v<scalar_t, torch::headeronly::Half>;

#if MPSEG_AVX2_DISPATCH
#define MPSEG_CPU_LOOPS(function, wanted) \
  ((wanted) && use_avx2() ? avx2::function<scalar_t> : generic::function<scalar_t>)
#else
#define MPSEG_CPU_LOOPS(function, wanted) generic::function<scalar_t>
#endif

Tensor forward_cpu(const Tensor& value, const Tensor& spatial_shapes, const Tensor& level_start_index,
                       const Tensor& sampling_locations, const Tensor& attention_weights) {
  const Sizes n = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Tensor shapes = torch::stable::contiguous(spatial_shapes);
  const Tensor starts = torch::stable::contiguous(level_start_index);
  check_levels_host(shapes, starts, n.rows);
  Tensor output = empty(value, {n.batch, n.queries, n.heads * n.channels}, value.scalar_type());  // fully written
  if (output.numel() == 0) return output;
  const Tensor v = torch::stable::contiguous(value);
  const Tensor loc = torch::stable::contiguous(sampling_locations);
  const Tensor w = torch::stable::contiguous(attention_weights);
  THO_DISPATCH_V2(value.scalar_type(), "ms_deform_attn_forward_cpu", AT_WRAP([&] {
    MPSEG_CPU_LOOPS(forward_kernel, true)(v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                             starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(),
                             w.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), n);
  }), AT_FLOATING_TYPES, ScalarType::Half, ScalarType::BFloat16);
  return output;
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad_output, const Tensor& value,
                                                            const Tensor& spatial_shapes,
                                                            const Tensor& level_start_index,
                                                            const Tensor& sampling_locations,
                                                            const Tensor& attention_weights) {
  const Sizes n =
      check_backward_inputs(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Tensor shapes = torch::stable::contiguous(spatial_shapes);
  const Tensor starts = torch::stable::contiguous(level_start_index);
  check_levels_host(shapes, starts, n.rows);
  Tensor grad_value = zeros_like(value);
  Tensor grad_locations = zeros_like(sampling_locations);
  Tensor grad_weights = zeros_like(attention_weights);
  if (n.batch * n.queries * n.heads * n.levels * n.points == 0 || value.numel() == 0) {
    return {grad_value, grad_locations, grad_weights};
  }
  const Tensor g = torch::stable::contiguous(grad_output);
  const Tensor v = torch::stable::contiguous(value);
  const Tensor loc = torch::stable::contiguous(sampling_locations);
  const Tensor w = torch::stable::contiguous(attention_weights);
  THO_DISPATCH_V2(value.scalar_type(), "ms_deform_attn_backward_cpu", AT_WRAP([&] {
    using opmath_t = acc_type<scalar_t>;
    const bool reduced = !(std::is_same_v<opmath_t, scalar_t>);  // parenthesised: a macro argument
    Tensor acc = reduced ? zeros(value, value.sizes(), scalar_type_of<opmath_t>())
                             : grad_value;
    MPSEG_CPU_LOOPS(backward_kernel, kAvx2Backward<scalar_t>)(g.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                              shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
                              loc.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                              acc.mutable_data_ptr<opmath_t>(), grad_locations.mutable_data_ptr<scalar_t>(),
                              grad_weights.mutable_data_ptr<scalar_t>(), n);
    if (reduced) torch::stable::copy_(grad_value, acc);
  }), AT_FLOATING_TYPES, ScalarType::Half, ScalarType::BFloat16);
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mpseg, CPU, m) {
  m.impl("ms_deform_attn", TORCH_BOX(&forward_cpu));
  m.impl("_ms_deform_attn_backward", TORCH_BOX(&backward_cpu));
}

}  // namespace msda
}  // namespace mpseg
