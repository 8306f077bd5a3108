// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// CPU kernels of mpseg::ms_deform_attn. Arithmetic per sample comes from ../sampling.h (shared with CUDA); this file
// owns the loops. Reduced precision (bf16/fp16) accumulates in float (acc_type, as ATen's opmath_type).
//
// Determinism: the backward uses no atomics and no thread-count-dependent reduction. Work is split into units
// (batch b, head m, level l); a unit owns grad_value[b, rows of level l, m, :] (disjoint from every other unit's rows)
// and the location/attention gradients of its samples, and visits its samples in a fixed order. So two runs give
// bit-identical gradients whatever the number of threads. Every unit handles Q * P samples, so the split is balanced.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/core/Dispatch_v2.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "ms_deform_attn/cpu/avx2.h"
#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/sampling.h"

namespace mpseg {
namespace msda {
namespace {

// Channel loops. Values of one (b, m) row are D contiguous channels, so the loops run over channels with several
// independent vector accumulators: the loads of different (randomly placed) value rows then overlap instead of
// waiting on one dependent chain. GCC does not vectorise these reliably on its own (it kept 32 scalar accumulators in
// memory), hence explicit GCC/Clang vector types for float and double; bf16/fp16 take the plain loops. The backward
// dot products sum lane by lane, then the lanes in a fixed order: the same bits whatever the thread count.
#if defined(__GNUC__)
#define MPSEG_HAS_VECTOR_TYPES 1
template <typename T>
struct Simd {
  // 16 bytes: a native register on every x86-64 (SSE2) and AArch64 (NEON) CPU; wider types get emulated (spilled).
  typedef T type __attribute__((vector_size(16)));
  static constexpr int64_t lanes = 16 / sizeof(T);
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, const type& v) { std::memcpy(p, &v, sizeof(v)); }
  static type broadcast(T x) { return type{} + x; }
};
#else
#define MPSEG_HAS_VECTOR_TYPES 0
#endif

// out[d] = sum_i weights[i] * rows[i][d] for d < channels.
template <typename scalar_t, typename opmath_t>
inline void weighted_row_sum(const scalar_t* const* __restrict__ rows, const opmath_t* __restrict__ weights,
                             int64_t count, int64_t channels, scalar_t* __restrict__ out) {
  int64_t d = 0;
#if MPSEG_HAS_VECTOR_TYPES
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    using S = Simd<opmath_t>;
    using V = typename S::type;
    constexpr int64_t kVecs = 8;  // 32 floats = one (b, m) row of the common D = 32, or 16 doubles
    for (; d + kVecs * S::lanes <= channels; d += kVecs * S::lanes) {
      V acc[kVecs] = {};
      for (int64_t i = 0; i < count; ++i) {
        const scalar_t* row = rows[i] + d;
        const V w = S::broadcast(weights[i]);
#pragma GCC unroll 8
        for (int64_t k = 0; k < kVecs; ++k) acc[k] += w * S::load(row + k * S::lanes);
      }
#pragma GCC unroll 8
      for (int64_t k = 0; k < kVecs; ++k) S::store(out + d + k * S::lanes, acc[k]);
    }
    for (; d + S::lanes <= channels; d += S::lanes) {
      V acc = {};
      for (int64_t i = 0; i < count; ++i) acc += S::broadcast(weights[i]) * S::load(rows[i] + d);
      S::store(out + d, acc);
    }
  }
#endif
  for (; d < channels; ++d) {
    opmath_t acc = 0;
    for (int64_t i = 0; i < count; ++i) acc += weights[i] * static_cast<opmath_t>(rows[i][d]);
    out[d] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* locations,
                    const scalar_t* weights, scalar_t* output, const Sizes& n) {
  using opmath_t = acc_type<scalar_t>;
  const int64_t row_stride = n.heads * n.channels;  // value rows: [S, M, D]
  const int64_t samples = n.levels * n.points;
  // One task = one (b, q, m): D outputs from up to 4*L*P value rows.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, samples * n.channels));
  torch::stable::parallel_for(0, n.batch * n.queries * n.heads, grain, [&](int64_t begin, int64_t end) {
    // The task's corner rows and their weights (attention * bilinear), gathered first, then summed channel-block-wise.
    std::vector<const scalar_t*> rows(4 * samples);
    std::vector<opmath_t> row_weights(4 * samples);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m = task % n.heads;
      const int64_t b = task / (n.heads * n.queries);
      const scalar_t* loc = locations + task * samples * 2;  // [B, Q, M] flattened = task
      const scalar_t* w = weights + task * samples;
      int64_t count = 0;
      for (int64_t l = 0; l < n.levels; ++l) {
        const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
        const scalar_t* level_value = value + (b * n.rows + starts[l]) * row_stride + m * n.channels;
        for (int64_t p = 0; p < n.points; ++p) {
          const int64_t k = l * n.points + p;
          Bilinear<opmath_t> s;
          if (!bilinear_setup(static_cast<opmath_t>(loc[2 * k]), static_cast<opmath_t>(loc[2 * k + 1]), height,
                              width, s)) {
            continue;
          }
          const opmath_t attention = static_cast<opmath_t>(w[k]);
          for (int c = 0; c < 4; ++c) {
            if (!s.valid[c]) continue;
            rows[count] = level_value + s.index[c] * row_stride;
            row_weights[count] = attention * s.weight[c];
            ++count;
          }
        }
      }
      weighted_row_sum(rows.data(), row_weights.data(), count, n.channels, output + task * n.channels);
    }
  });
}

// Adds scale * grad to grad_row and returns <grad, value_row>, both over `channels`.
template <typename scalar_t, typename opmath_t>
inline opmath_t dot_and_scatter(const opmath_t* __restrict__ grad, const scalar_t* __restrict__ value_row,
                                opmath_t scale, opmath_t* __restrict__ grad_row, int64_t channels) {
  int64_t d = 0;
  opmath_t sum = 0;
#if MPSEG_HAS_VECTOR_TYPES
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    using S = Simd<opmath_t>;
    using V = typename S::type;
    constexpr int64_t kVecs = 4;
    V lanes[kVecs] = {};
    const V scale_v = S::broadcast(scale);
    for (; d + kVecs * S::lanes <= channels; d += kVecs * S::lanes) {
#pragma GCC unroll 4
      for (int64_t k = 0; k < kVecs; ++k) {
        const int64_t at = d + k * S::lanes;
        const V g = S::load(grad + at);
        lanes[k] += g * S::load(value_row + at);
        S::store(grad_row + at, S::load(grad_row + at) + scale_v * g);
      }
    }
    for (; d + S::lanes <= channels; d += S::lanes) {
      const V g = S::load(grad + d);
      lanes[0] += g * S::load(value_row + d);
      S::store(grad_row + d, S::load(grad_row + d) + scale_v * g);
    }
    for (int64_t k = 0; k < kVecs; ++k) {
      for (int64_t j = 0; j < S::lanes; ++j) sum += lanes[k][j];
    }
  }
#endif
  for (; d < channels; ++d) {
    sum += grad[d] * static_cast<opmath_t>(value_row[d]);
    grad_row[d] += scale * grad[d];
  }
  return sum;
}

// grad_value is written through `grad_value_acc` (opmath_t: float for bf16/fp16, so sums of many small updates keep
// their precision). It must be zero on entry.
constexpr int64_t kPrefetchQueries = 16;

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                     const scalar_t* locations, const scalar_t* weights, acc_type<scalar_t>* grad_value_acc,
                     scalar_t* grad_locations, scalar_t* grad_weights, const Sizes& n) {
  using opmath_t = acc_type<scalar_t>;
  const int64_t row_stride = n.heads * n.channels;
  const int64_t samples = n.levels * n.points;
  torch::stable::parallel_for(0, n.batch * n.heads * n.levels, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> grad(n.channels);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t l = unit % n.levels;
      const int64_t m = (unit / n.levels) % n.heads;
      const int64_t b = unit / (n.levels * n.heads);
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const int64_t level_offset = (b * n.rows + starts[l]) * row_stride + m * n.channels;
      const scalar_t* level_value = value + level_offset;
      opmath_t* level_grad_value = grad_value_acc + level_offset;
      for (int64_t q = 0; q < n.queries; ++q) {
        const int64_t task = (b * n.queries + q) * n.heads + m;  // (b, q, m)
        const scalar_t* g = grad_output + task * n.channels;
#if defined(__GNUC__)
        // A unit reads grad_output and the locations with a stride of a whole query (M*D resp. M*L*P*2 elements),
        // which the hardware prefetchers follow poorly: fetch a few queries ahead.
        if (q + kPrefetchQueries < n.queries) {
          const scalar_t* g_ahead = g + kPrefetchQueries * n.heads * n.channels;
          for (int64_t d = 0; d < n.channels; d += 64 / sizeof(scalar_t)) __builtin_prefetch(g_ahead + d);
          const int64_t k_ahead = (task + kPrefetchQueries * n.heads) * samples + l * n.points;
          __builtin_prefetch(locations + 2 * k_ahead);
          __builtin_prefetch(weights + k_ahead);
        }
#endif
        const opmath_t* grad_row;
        if constexpr (std::is_same_v<scalar_t, opmath_t>) {
          grad_row = g;
        } else {
          for (int64_t d = 0; d < n.channels; ++d) grad[d] = static_cast<opmath_t>(g[d]);
          grad_row = grad.data();
        }
        for (int64_t p = 0; p < n.points; ++p) {
          const int64_t k = task * samples + l * n.points + p;  // (b, q, m, l, p)
          Bilinear<opmath_t> s;
          if (!bilinear_setup(static_cast<opmath_t>(locations[2 * k]), static_cast<opmath_t>(locations[2 * k + 1]),
                              height, width, s)) {
            continue;  // gradients stay zero
          }
          const opmath_t attention = static_cast<opmath_t>(weights[k]);
          opmath_t dot[4] = {0, 0, 0, 0};
          for (int c = 0; c < 4; ++c) {
            if (!s.valid[c]) continue;
            const int64_t offset = s.index[c] * row_stride;
            dot[c] = dot_and_scatter(grad_row, level_value + offset, attention * s.weight[c],
                                     level_grad_value + offset, n.channels);
          }
          opmath_t grad_attention, grad_x, grad_y;
          sample_gradients(s, dot, attention, height, width, &grad_attention, &grad_x, &grad_y);
          grad_weights[k] = static_cast<scalar_t>(grad_attention);
          grad_locations[2 * k] = static_cast<scalar_t>(grad_x);
          grad_locations[2 * k + 1] = static_cast<scalar_t>(grad_y);
        }
      }
    }
  });
}

Tensor forward_cpu(const Tensor& value, const Tensor& spatial_shapes, const Tensor& level_start_index,
                       const Tensor& sampling_locations, const Tensor& attention_weights) {
  const Sizes n = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const DenseInputs in(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_levels_host(in.shapes, in.starts, n.rows);
  Tensor output = empty(value, {n.batch, n.queries, n.heads * n.channels}, value.scalar_type());  // fully written
  if (output.numel() == 0) return output;
  THO_DISPATCH_V2(value.scalar_type(), "ms_deform_attn_forward_cpu", AT_WRAP([&] {
    if (avx2::enabled() && avx2::forward_supported<scalar_t>(in.shapes.const_data_ptr<int64_t>(), n)) {
      avx2::forward<scalar_t>(in.value, in.value.const_data_ptr<scalar_t>(), in.shapes.const_data_ptr<int64_t>(),
                              in.starts.const_data_ptr<int64_t>(), in.locations.const_data_ptr<scalar_t>(),
                              in.weights.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), n);
    } else {
      forward_kernel<scalar_t>(in.value.const_data_ptr<scalar_t>(), in.shapes.const_data_ptr<int64_t>(),
                               in.starts.const_data_ptr<int64_t>(), in.locations.const_data_ptr<scalar_t>(),
                               in.weights.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), n);
    }
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
  const DenseInputs in(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_levels_host(in.shapes, in.starts, n.rows);
  Tensor grad_value = zeros_like(value);
  Tensor grad_locations = zeros_like(sampling_locations);
  Tensor grad_weights = zeros_like(attention_weights);
  if (n.batch * n.queries * n.heads * n.levels * n.points == 0 || value.numel() == 0) {
    return {grad_value, grad_locations, grad_weights};
  }
  const Tensor g = torch::stable::contiguous(grad_output);
  THO_DISPATCH_V2(value.scalar_type(), "ms_deform_attn_backward_cpu", AT_WRAP([&] {
    using opmath_t = acc_type<scalar_t>;
    const bool reduced = !(std::is_same_v<opmath_t, scalar_t>);  // parenthesised: a macro argument
    Tensor acc = reduced ? zeros(value, value.sizes(), scalar_type_of<opmath_t>())
                             : grad_value;
    if (avx2::enabled() && avx2::backward_supported<scalar_t>(in.shapes.const_data_ptr<int64_t>(), n)) {
      avx2::backward<scalar_t>(in.value, g.const_data_ptr<scalar_t>(), in.value.const_data_ptr<scalar_t>(),
                               in.shapes.const_data_ptr<int64_t>(), in.starts.const_data_ptr<int64_t>(),
                               in.locations.const_data_ptr<scalar_t>(), in.weights.const_data_ptr<scalar_t>(),
                               acc.mutable_data_ptr<opmath_t>(), grad_locations.mutable_data_ptr<scalar_t>(),
                               grad_weights.mutable_data_ptr<scalar_t>(), n);
    } else {
      backward_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), in.value.const_data_ptr<scalar_t>(),
                                in.shapes.const_data_ptr<int64_t>(), in.starts.const_data_ptr<int64_t>(),
                                in.locations.const_data_ptr<scalar_t>(), in.weights.const_data_ptr<scalar_t>(),
                                acc.mutable_data_ptr<opmath_t>(), grad_locations.mutable_data_ptr<scalar_t>(),
                                grad_weights.mutable_data_ptr<scalar_t>(), n);
    }
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
