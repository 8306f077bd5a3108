// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// CUDA kernels of mpseg::ms_deform_attn. The bilinear sampling and gradient arithmetic is ../sampling.h, the same
// __host__ __device__ code the CPU kernel runs; this file only maps the loops onto threads.
//
// - Forward: one thread per output element (b, q, m, d); consecutive threads read consecutive channels (coalesced).
// - Backward: one thread per sample (b, q, m, l, p). It owns that sample's location and attention-weight gradients
//   (plain stores) and adds its share to grad_value with atomicAdd on a float/double buffer. Atomics make grad_value's
//   summation order, hence its last bits, vary between runs: the op reports this to
//   torch.use_deterministic_algorithms (warn or error, as the user chose). The CPU kernel is deterministic.
// - Level metadata stays on the device (no host sync); kernels skip levels that do not fit value (level_in_bounds).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>
#include <string>

#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/sampling.h"

#define MPSEG_STRINGIFY_(...) #__VA_ARGS__
#define MPSEG_STRINGIFY(...) MPSEG_STRINGIFY_(__VA_ARGS__)

namespace mpseg {

std::string cuda_build_info() {
  std::ostringstream out;
  out << "\"cuda_version\": \"" << CUDART_VERSION / 1000 << "." << (CUDART_VERSION % 1000) / 10 << "\"";
#ifdef __CUDA_ARCH_LIST__
  // nvcc defines __CUDA_ARCH_LIST__ (e.g. 750,800,900) with the architectures this file was compiled for.
  out << ", \"cuda_archs\": [" MPSEG_STRINGIFY(__CUDA_ARCH_LIST__) "]";
#else
  out << ", \"cuda_archs\": []";
#endif
  return out.str();
}

namespace msda {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  // Grid-stride loops cover any n; cap the grid well inside CUDA's limit.
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 20));
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const scalar_t* __restrict__ locations,
                               const scalar_t* __restrict__ weights, scalar_t* __restrict__ output, Sizes n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t total = n.batch * n.queries * n.heads * n.channels;
  const int64_t row_stride = n.heads * n.channels;
  const int64_t samples = n.levels * n.points;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t d = i % n.channels;
    const int64_t task = i / n.channels;  // (b, q, m)
    const int64_t m = task % n.heads;
    const int64_t b = task / (n.heads * n.queries);
    const scalar_t* loc = locations + task * samples * 2;
    const scalar_t* w = weights + task * samples;
    opmath_t acc = 0;
    for (int64_t l = 0; l < n.levels; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1], start = starts[l];
      if (!level_in_bounds(height, width, start, n.rows)) continue;
      const scalar_t* level_value = value + (b * n.rows + start) * row_stride + m * n.channels + d;
      for (int64_t p = 0; p < n.points; ++p) {
        const int64_t k = l * n.points + p;
        Bilinear<opmath_t> s;
        if (!bilinear_setup(static_cast<opmath_t>(loc[2 * k]), static_cast<opmath_t>(loc[2 * k + 1]), height, width,
                            s)) {
          continue;
        }
        const opmath_t attention = static_cast<opmath_t>(w[k]);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (s.valid[c]) acc += attention * s.weight[c] * static_cast<opmath_t>(level_value[s.index[c] * row_stride]);
        }
      }
    }
    output[i] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ locations, const scalar_t* __restrict__ weights,
                                at::opmath_type<scalar_t>* __restrict__ grad_value_acc,
                                scalar_t* __restrict__ grad_locations, scalar_t* __restrict__ grad_weights, Sizes n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t total = n.batch * n.queries * n.heads * n.levels * n.points;
  const int64_t row_stride = n.heads * n.channels;
  const int64_t samples = n.levels * n.points;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t task = k / samples;  // (b, q, m)
    const int64_t l = (k % samples) / n.points;
    const int64_t m = task % n.heads;
    const int64_t b = task / (n.heads * n.queries);
    const int64_t height = shapes[2 * l], width = shapes[2 * l + 1], start = starts[l];
    opmath_t grad_attention = 0, grad_x = 0, grad_y = 0;
    Bilinear<opmath_t> s;
    if (level_in_bounds(height, width, start, n.rows) &&
        bilinear_setup(static_cast<opmath_t>(locations[2 * k]), static_cast<opmath_t>(locations[2 * k + 1]), height,
                       width, s)) {
      const int64_t level_offset = (b * n.rows + start) * row_stride + m * n.channels;
      const scalar_t* g = grad_output + task * n.channels;
      const opmath_t attention = static_cast<opmath_t>(weights[k]);
      opmath_t dot[4] = {0, 0, 0, 0};
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (!s.valid[c]) continue;
        const int64_t offset = level_offset + s.index[c] * row_stride;
        const opmath_t cw = attention * s.weight[c];
        opmath_t sum = 0;
        for (int64_t d = 0; d < n.channels; ++d) {
          const opmath_t gd = static_cast<opmath_t>(g[d]);
          sum += gd * static_cast<opmath_t>(value[offset + d]);
          atomicAdd(grad_value_acc + offset + d, cw * gd);
        }
        dot[c] = sum;
      }
      sample_gradients(s, dot, attention, height, width, &grad_attention, &grad_x, &grad_y);
    }
    grad_weights[k] = static_cast<scalar_t>(grad_attention);
    grad_locations[2 * k] = static_cast<scalar_t>(grad_x);
    grad_locations[2 * k + 1] = static_cast<scalar_t>(grad_y);
  }
}

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Sizes n = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor output = at::empty({n.batch, n.queries, n.heads * n.channels}, value.options());  // fully written
  if (output.numel() == 0) return output;
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor v = value.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor w = attention_weights.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(output.numel()), kThreads, 0, stream>>>(
        v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
        loc.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output, const at::Tensor& value,
                                                             const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights) {
  const Sizes n =
      check_backward_inputs(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor grad_value = at::zeros_like(value, at::MemoryFormat::Contiguous);
  at::Tensor grad_locations = at::zeros_like(sampling_locations, at::MemoryFormat::Contiguous);
  at::Tensor grad_weights = at::zeros_like(attention_weights, at::MemoryFormat::Contiguous);
  const int64_t total = n.batch * n.queries * n.heads * n.levels * n.points;
  if (total == 0 || value.numel() == 0) return {grad_value, grad_locations, grad_weights};
  at::globalContext().alertNotDeterministic("mpseg::_ms_deform_attn_backward (CUDA, atomicAdd into grad_value)");
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor v = value.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor w = attention_weights.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // Half-precision atomics would round every update; accumulate in float and round once.
    const bool reduced = !std::is_same_v<opmath_t, scalar_t>;
    at::Tensor acc = reduced ? at::zeros(value.sizes(), value.options().dtype(c10::CppTypeToScalarType<opmath_t>()))
                             : grad_value;
    backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
        starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        acc.mutable_data_ptr<opmath_t>(), grad_locations.mutable_data_ptr<scalar_t>(),
        grad_weights.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (reduced) grad_value.copy_(acc);
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(mpseg, CUDA, m) {
  m.impl("ms_deform_attn", &forward_cuda);
  m.impl("_ms_deform_attn_backward", &backward_cuda);
}

}  // namespace msda
}  // namespace mpseg
