// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// CUDA kernels of mpseg::ms_deform_attn. The bilinear sampling and gradient arithmetic is ../sampling.h, the same
// __host__ __device__ code the CPU kernel runs; this file only maps the loops onto threads.
//
// - Forward: one thread per output element (b, q, m, d); consecutive threads read consecutive channels (coalesced).
// - Backward: one warp per task (b, q, m), lanes over channels (warp_split / lane_corner_partials in ../sampling.h):
//   a warp's atomicAdds into grad_value hit consecutive channels of one row (coalesced), and each sample's location
//   and weight gradients are sums over channels reduced with warp shuffles (an xor butterfly), written by one lane.
//   grad_value is accumulated with atomicAdd on a float/double buffer (float for half types, rounded once at the
//   end). Atomics make its summation order, hence its last bits, vary between runs: the op's autograd rule reports
//   this to torch.use_deterministic_algorithms (warn or error, as the user chose). The CPU kernel is deterministic.
// - Both kernels index with int32 when every offset of the call fits (fits_int32), int64 otherwise.
// - Level metadata stays on the device (no host sync); kernels skip levels that do not fit value (level_in_bounds).
//
// The backward's decomposition (which lane takes which channels and samples, the butterfly's summation order) also
// runs on the CPU in ../warp_emulation.cpp, which the CPU tests check against the float64 oracle.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/core/Dispatch_v2.h>

#include <algorithm>
#include <sstream>
#include <string>

#include "cuda_stable.h"
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

// Sizes as the kernels' index type (int32 when fits_int32, else int64).
template <typename index_t>
struct IndexSizes {
  index_t batch, rows, heads, channels, queries, levels, points;
  explicit IndexSizes(const Sizes& n)
      : batch(static_cast<index_t>(n.batch)), rows(static_cast<index_t>(n.rows)),
        heads(static_cast<index_t>(n.heads)), channels(static_cast<index_t>(n.channels)),
        queries(static_cast<index_t>(n.queries)), levels(static_cast<index_t>(n.levels)),
        points(static_cast<index_t>(n.points)) {}
};

template <typename scalar_t, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const scalar_t* __restrict__ locations,
                               const scalar_t* __restrict__ weights, scalar_t* __restrict__ output,
                               IndexSizes<index_t> n) {
  using opmath_t = acc_type<scalar_t>;
  const index_t total = n.batch * n.queries * n.heads * n.channels;
  const index_t row_stride = n.heads * n.channels;
  const index_t samples = n.levels * n.points;
  // The grid-stride step in int64: i + step may pass index_t's range on the last iteration.
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i64 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i64 < total; i64 += step) {
    const index_t i = static_cast<index_t>(i64);
    const index_t d = i % n.channels;
    const index_t task = i / n.channels;  // (b, q, m)
    const index_t m = task % n.heads;
    const index_t b = task / (n.heads * n.queries);
    const scalar_t* loc = locations + task * samples * 2;
    const scalar_t* w = weights + task * samples;
    opmath_t acc = 0;
    for (index_t l = 0; l < n.levels; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1], start = starts[l];
      if (!level_in_bounds(height, width, start, n.rows)) continue;
      const scalar_t* level_value =
          value + (b * n.rows + static_cast<index_t>(start)) * row_stride + m * n.channels + d;
      for (index_t p = 0; p < n.points; ++p) {
        const index_t k = l * n.points + p;
        Bilinear<opmath_t> s;
        if (!bilinear_setup(static_cast<opmath_t>(loc[2 * k]), static_cast<opmath_t>(loc[2 * k + 1]), height, width,
                            s)) {
          continue;
        }
        const opmath_t attention = static_cast<opmath_t>(w[k]);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (s.valid[c]) {
            acc += attention * s.weight[c] *
                   static_cast<opmath_t>(level_value[static_cast<index_t>(s.index[c]) * row_stride]);
          }
        }
      }
    }
    output[i] = static_cast<scalar_t>(acc);
  }
}

struct AtomicAdd {
  template <typename T>
  __device__ void operator()(T* address, T amount) const {
    atomicAdd(address, amount);
  }
};

// Sum over the `group` lanes of each aligned group (xor butterfly; butterfly_sum_host in ../sampling.h is the same
// summation on the host). Every lane of the warp must call it: the shuffles name all 32 lanes.
template <typename T>
__device__ inline T group_sum(T x, int group) {
  for (int offset = group / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename scalar_t, typename index_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ locations, const scalar_t* __restrict__ weights,
                                acc_type<scalar_t>* __restrict__ grad_value_acc,
                                scalar_t* __restrict__ grad_locations, scalar_t* __restrict__ grad_weights,
                                IndexSizes<index_t> n, WarpSplit split) {
  using opmath_t = acc_type<scalar_t>;
  const index_t tasks = n.batch * n.queries * n.heads;
  const index_t row_stride = n.heads * n.channels;
  const index_t samples = n.levels * n.points;
  const int lane = threadIdx.x % kWarpLanes;
  const int member = lane % split.group;  // lane within its group: first channel
  const int slot = lane / split.group;    // which of the warp's samples of this pass
  const int64_t warps = static_cast<int64_t>(blockDim.x / kWarpLanes) * gridDim.x;
  // The task loop and the pass loop are uniform across the warp, so every lane reaches every shuffle.
  for (int64_t task64 = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarpLanes; task64 < tasks;
       task64 += warps) {
    const index_t task = static_cast<index_t>(task64);
    const index_t m = task % n.heads;
    const index_t b = task / (n.heads * n.queries);
    const scalar_t* g = grad_output + task * n.channels;
    for (index_t pass = 0; pass < samples; pass += split.samples) {
      const index_t j = pass + slot;  // the sample (l, p) of this lane's group
      const index_t k = task * samples + j;
      opmath_t dot[4] = {0, 0, 0, 0};
      Bilinear<opmath_t> s;
      bool active = false;
      int64_t height = 0, width = 0;
      opmath_t attention = 0;
      if (j < samples) {
        const index_t l = j / n.points;
        height = shapes[2 * l];
        width = shapes[2 * l + 1];
        const int64_t start = starts[l];
        active = level_in_bounds(height, width, start, n.rows) &&
                 bilinear_setup(static_cast<opmath_t>(locations[2 * k]), static_cast<opmath_t>(locations[2 * k + 1]),
                                height, width, s);
        if (active) {
          attention = static_cast<opmath_t>(weights[k]);
          const index_t level_offset = (b * n.rows + static_cast<index_t>(start)) * row_stride + m * n.channels;
          lane_corner_partials<index_t>(s, attention, g, value + level_offset, grad_value_acc + level_offset,
                                        row_stride, n.channels, static_cast<index_t>(member),
                                        static_cast<index_t>(split.group), dot, AtomicAdd{});
        }
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) dot[c] = group_sum(dot[c], split.group);
      if (j < samples && member == 0) {
        opmath_t grad_attention = 0, grad_x = 0, grad_y = 0;
        if (active) sample_gradients(s, dot, attention, height, width, &grad_attention, &grad_x, &grad_y);
        grad_weights[k] = static_cast<scalar_t>(grad_attention);
        grad_locations[2 * k] = static_cast<scalar_t>(grad_x);
        grad_locations[2 * k + 1] = static_cast<scalar_t>(grad_y);
      }
    }
  }
}

Tensor forward_cuda(const Tensor& value, const Tensor& spatial_shapes, const Tensor& level_start_index,
                        const Tensor& sampling_locations, const Tensor& attention_weights) {
  const Sizes n = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const torch::stable::accelerator::DeviceGuard guard(value.get_device_index());
  Tensor output = empty(value, {n.batch, n.queries, n.heads * n.channels}, value.scalar_type());  // fully written
  if (output.numel() == 0) return output;
  const DenseInputs in(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const cudaStream_t stream = current_stream(value.get_device_index());
  THO_DISPATCH_V2(value.scalar_type(), "ms_deform_attn_forward_cuda", AT_WRAP([&] {
    auto launch = [&](auto index) {
      using index_t = decltype(index);
      launch_kernel(forward_kernel<scalar_t, index_t>, blocks_for(output.numel()), kThreads, stream,
          in.value.const_data_ptr<scalar_t>(), in.shapes.const_data_ptr<int64_t>(),
          in.starts.const_data_ptr<int64_t>(), in.locations.const_data_ptr<scalar_t>(),
          in.weights.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), IndexSizes<index_t>(n));
    };
    if (fits_int32(in.value.numel(), in.weights.numel(), output.numel())) {
      launch(int32_t{0});
    } else {
      launch(int64_t{0});
    }
  }), AT_FLOATING_TYPES, ScalarType::Half, ScalarType::BFloat16);
  return output;
}

std::tuple<Tensor, Tensor, Tensor> backward_cuda(const Tensor& grad_output, const Tensor& value,
                                                             const Tensor& spatial_shapes,
                                                             const Tensor& level_start_index,
                                                             const Tensor& sampling_locations,
                                                             const Tensor& attention_weights) {
  const Sizes n =
      check_backward_inputs(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const torch::stable::accelerator::DeviceGuard guard(value.get_device_index());
  Tensor grad_value = zeros_like(value);
  Tensor grad_locations = zeros_like(sampling_locations);
  Tensor grad_weights = zeros_like(attention_weights);
  const int64_t total = n.batch * n.queries * n.heads * n.levels * n.points;
  if (total == 0 || value.numel() == 0) return {grad_value, grad_locations, grad_weights};
  // Non-deterministic (atomicAdd into grad_value): torch.use_deterministic_algorithms is honoured by the op's autograd
  // rule in Python (mpseg/ops/ms_deform_attn.py), the stable ABI having no call for it.
  const Tensor g = torch::stable::contiguous(grad_output);
  const DenseInputs in(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const cudaStream_t stream = current_stream(value.get_device_index());
  THO_DISPATCH_V2(value.scalar_type(), "ms_deform_attn_backward_cuda", AT_WRAP([&] {
    using opmath_t = acc_type<scalar_t>;
    // Half-precision atomics would round every update; accumulate in float and round once.
    const bool reduced = !(std::is_same_v<opmath_t, scalar_t>);  // parenthesised: a macro argument
    Tensor acc = reduced ? zeros(value, value.sizes(), scalar_type_of<opmath_t>())
                             : grad_value;
    // One warp per task (b, q, m): kThreads / 32 tasks per block.
    const int64_t tasks = n.batch * n.queries * n.heads;
    auto launch = [&](auto index) {
      using index_t = decltype(index);
      launch_kernel(backward_kernel<scalar_t, index_t>, blocks_for(tasks * kWarpLanes), kThreads, stream,
          g.const_data_ptr<scalar_t>(), in.value.const_data_ptr<scalar_t>(), in.shapes.const_data_ptr<int64_t>(),
          in.starts.const_data_ptr<int64_t>(), in.locations.const_data_ptr<scalar_t>(),
          in.weights.const_data_ptr<scalar_t>(),
          acc.mutable_data_ptr<opmath_t>(), grad_locations.mutable_data_ptr<scalar_t>(),
          grad_weights.mutable_data_ptr<scalar_t>(), IndexSizes<index_t>(n), warp_split(n.channels));
    };
    if (fits_int32(in.value.numel(), total, g.numel())) {
      launch(int32_t{0});
    } else {
      launch(int64_t{0});
    }
    if (reduced) torch::stable::copy_(grad_value, acc);
  }), AT_FLOATING_TYPES, ScalarType::Half, ScalarType::BFloat16);
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mpseg, CUDA, m) {
  m.impl("ms_deform_attn", TORCH_BOX(&forward_cuda));
  m.impl("_ms_deform_attn_backward", TORCH_BOX(&backward_cuda));
}

}  // namespace msda
}  // namespace mpseg
