// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// Bilinear sampling and its per-sample gradient for multi-scale deformable attention: the one definition of the
// arithmetic, compiled into both the CPU kernel and the CUDA kernel, so CPU tests exercise the same formulas the GPU
// runs. Only the loops over channels differ between backends (vectorised on CPU, one thread per channel on CUDA).
//
// Semantics are torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False): a
// normalised location x in [0, 1] maps to the pixel coordinate x * W - 0.5 (pixel centres at integer coordinates),
// corners outside the map contribute zero, and the gradient uses floor() corners exactly as grid_sample does.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MPSEG_HOST_DEVICE __host__ __device__
#else
#define MPSEG_HOST_DEVICE
#endif

namespace mpseg {
namespace msda {

// floor() of a coordinate already known to lie in [-1, size): truncation toward zero, corrected for negative
// non-integers. Exact, and a single conversion instruction instead of a libm call on CPUs without SSE4.1 rounding.
template <typename T>
MPSEG_HOST_DEVICE inline int64_t floor_in_range(T x) {
  const int64_t truncated = static_cast<int64_t>(x);
  return static_cast<T>(truncated) > x ? truncated - 1 : truncated;
}

// A level [start, start + height * width) of the flattened value tensor with S rows. The CPU op validates the level
// metadata up front; the CUDA op reads it on the device (no host sync), so every kernel re-checks it here and treats an
// inconsistent level as empty: a wrong spatial_shapes can then never make a kernel read out of bounds.
MPSEG_HOST_DEVICE inline bool level_in_bounds(int64_t height, int64_t width, int64_t start, int64_t rows) {
  return height > 0 && width > 0 && start >= 0 && start <= rows && height <= (rows - start) / width;
}

// The four corners of one bilinear sample, in the order (y0, x0), (y0, x1), (y1, x0), (y1, x1). `index` is the row
// y * W + x inside the level and is only meaningful where `valid` is true; `weight` is 0 where it is not.
template <typename T>
struct Bilinear {
  int64_t index[4];
  bool valid[4];
  T weight[4];
  T lx, ly;  // fractional parts: x - x0, y - y0
};

// Sets up the sample at pixel coordinates (x, y) (pixel centres at integers) on a height x width map. Returns false
// when no corner lies inside the map, which includes NaN and +-inf coordinates: the comparisons run on the
// floating-point value BEFORE any conversion to an integer (converting a NaN or a huge float to int64 is undefined
// behaviour). Shared with the point kernels of the mask losses (point_sampling/sampling.h).
template <typename T>
MPSEG_HOST_DEVICE inline bool bilinear_setup_pixel(T x, T y, int64_t height, int64_t width, Bilinear<T>& s) {
  // Some corner is inside iff floor(x) in [-1, W-1] and floor(y) in [-1, H-1]. Written so that NaN fails.
  if (!(x >= static_cast<T>(-1) && x < static_cast<T>(width) && y >= static_cast<T>(-1) &&
        y < static_cast<T>(height))) {
    return false;
  }
  const int64_t x0 = floor_in_range(x);
  const int64_t y0 = floor_in_range(y);
  const T fx = static_cast<T>(x0);
  const T fy = static_cast<T>(y0);
  const int64_t x1 = x0 + 1;
  const int64_t y1 = y0 + 1;
  s.lx = x - fx;
  s.ly = y - fy;
  const T hx = static_cast<T>(1) - s.lx;
  const T hy = static_cast<T>(1) - s.ly;
  // Both bounds of every corner are checked on the integers: the range check above runs in floating point, where a
  // width beyond 2^24 (float) is rounded and could let x0 reach W.
  const bool x0_in = x0 >= 0 && x0 < width;
  const bool x1_in = x1 >= 0 && x1 < width;
  const bool y0_in = y0 >= 0 && y0 < height;
  const bool y1_in = y1 >= 0 && y1 < height;
  s.valid[0] = y0_in && x0_in;
  s.valid[1] = y0_in && x1_in;
  s.valid[2] = y1_in && x0_in;
  s.valid[3] = y1_in && x1_in;
  s.index[0] = y0 * width + x0;
  s.index[1] = y0 * width + x1;
  s.index[2] = y1 * width + x0;
  s.index[3] = y1 * width + x1;
  s.weight[0] = s.valid[0] ? hy * hx : static_cast<T>(0);
  s.weight[1] = s.valid[1] ? hy * s.lx : static_cast<T>(0);
  s.weight[2] = s.valid[2] ? s.ly * hx : static_cast<T>(0);
  s.weight[3] = s.valid[3] ? s.ly * s.lx : static_cast<T>(0);
  return true;
}

// The same at normalised location (loc_x, loc_y): pixel coordinate loc * size - 0.5.
template <typename T>
MPSEG_HOST_DEVICE inline bool bilinear_setup(T loc_x, T loc_y, int64_t height, int64_t width, Bilinear<T>& s) {
  return bilinear_setup_pixel(loc_x * static_cast<T>(width) - static_cast<T>(0.5),
                              loc_y * static_cast<T>(height) - static_cast<T>(0.5), height, width, s);
}

// Gradients of one sample's contribution `attention * sum_c weight_c * value_c` to the output, given
// dot[c] = <grad_output, value_c> over the channels (0 for invalid corners):
//   grad_attention = sum_c weight_c * dot[c]
//   grad_loc_x     = attention * W * sum_c (d weight_c / d x) * dot[c]   (d x / d loc_x = W), same for y with H.
// The value gradient, attention * weight_c * grad_output, is applied by the caller channel by channel.
template <typename T>
MPSEG_HOST_DEVICE inline void sample_gradients(const Bilinear<T>& s, const T dot[4], T attention, int64_t height,
                                               int64_t width, T* grad_attention, T* grad_loc_x, T* grad_loc_y) {
  const T hx = static_cast<T>(1) - s.lx;
  const T hy = static_cast<T>(1) - s.ly;
  *grad_attention = s.weight[0] * dot[0] + s.weight[1] * dot[1] + s.weight[2] * dot[2] + s.weight[3] * dot[3];
  // d weight / d x: (-hy, hy, -ly, ly); d weight / d y: (-hx, -lx, hx, lx).
  const T dx = hy * (dot[1] - dot[0]) + s.ly * (dot[3] - dot[2]);
  const T dy = hx * (dot[2] - dot[0]) + s.lx * (dot[3] - dot[1]);
  *grad_loc_x = attention * static_cast<T>(width) * dx;
  *grad_loc_y = attention * static_cast<T>(height) * dy;
}

// ---------------------------------------------------------------------------------------------------------------------
// How the CUDA backward maps one (b, q, m) task onto a warp of 32 lanes. Host-callable so that the CPU build runs the
// same decomposition (csrc/ms_deform_attn/warp_emulation.cpp, tests/test_cuda_decomposition.py).
//
// The lanes of a warp split into 32 / group groups of `group` lanes; each group takes one sample (l, p) of the task
// per pass, and lane r of a group takes channels r, r + group, r + 2 * group, ... So for the common D = 32 a warp's
// 32 atomicAdds into grad_value land on 32 consecutive channels of one row (one coalesced transaction per corner),
// where one thread per sample put them on 32 different rows. Each lane's partial dot products <grad_output, value>
// over its channels are summed over the group by an xor butterfly (warp shuffles), after which every lane of the
// group holds the same four sums and the group's first lane writes the sample's location and weight gradients.
struct WarpSplit {
  int group;    // lanes per sample: a power of two in [1, 32]; the smallest >= channels, at most 32
  int samples;  // samples per warp and pass: 32 / group
};

constexpr int kWarpLanes = 32;

MPSEG_HOST_DEVICE inline WarpSplit warp_split(int64_t channels) {
  int group = 1;
  while (group < kWarpLanes && group < channels) group *= 2;
  return WarpSplit{group, kWarpLanes / group};
}

// Whether every element offset of a call fits a signed 32-bit index (cheaper address arithmetic on the GPU). The
// largest offsets are value's and grad_value's (elements), sampling_locations' (2 per sample) and the output's.
MPSEG_HOST_DEVICE inline bool fits_int32(int64_t value_elements, int64_t samples, int64_t output_elements) {
  constexpr int64_t kMax = 2147483647;
  return value_elements <= kMax && samples <= kMax / 2 && output_elements <= kMax;
}

// One lane's share of one sample's backward: for each valid corner c, the partial dot product of grad_output and the
// corner's value row over the lane's channels (first, first + stride, ...), and the matching value gradient
// attention * weight_c * grad_output[d], handed to add(pointer, amount) (atomicAdd on the GPU, a plain add on the
// host). `value` and `grad_value` point at channel 0 of the level's first row for this (b, m); rows are row_stride
// apart. Invalid corners get dot[c] = 0, as sample_gradients expects.
template <typename index_t, typename opmath_t, typename scalar_t, typename Add>
MPSEG_HOST_DEVICE inline void lane_corner_partials(const Bilinear<opmath_t>& s, opmath_t attention,
                                                   const scalar_t* grad_output, const scalar_t* value,
                                                   opmath_t* grad_value, index_t row_stride, index_t channels,
                                                   index_t first, index_t stride, opmath_t dot[4], Add add) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int c = 0; c < 4; ++c) {
    dot[c] = static_cast<opmath_t>(0);
    if (!s.valid[c]) continue;
    const index_t row = static_cast<index_t>(s.index[c]) * row_stride;
    const opmath_t corner_weight = attention * s.weight[c];
    for (index_t d = first; d < channels; d += stride) {
      const opmath_t gd = static_cast<opmath_t>(grad_output[d]);
      dot[c] += gd * static_cast<opmath_t>(value[row + d]);
      add(grad_value + row + d, corner_weight * gd);
    }
  }
}

// What the CUDA backward's xor butterfly leaves in each of 32 lanes: for offset = group / 2, ..., 1, lane i adds the
// value of lane i ^ offset (which stays inside its aligned group). The host version of the shuffles, summing in the
// same order; a + b == b + a in floating point, so all lanes of a group end with identical bits.
template <typename T>
inline void butterfly_sum_host(T lanes[kWarpLanes], int group) {
  for (int offset = group / 2; offset > 0; offset /= 2) {
    T next[kWarpLanes];
    for (int i = 0; i < kWarpLanes; ++i) next[i] = lanes[i] + lanes[i ^ offset];
    for (int i = 0; i < kWarpLanes; ++i) lanes[i] = next[i];
  }
}

}  // namespace msda
}  // namespace mpseg
