// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// Point lookups of the mask losses (PointRend / Mask2Former): the one definition of their per-point arithmetic,
// compiled into the CPU kernels and the CUDA kernels, so CPU tests exercise the formulas the GPU runs.
//
// Semantics are those of torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)
// on points in the unit square: the normalised coordinate c maps to the pixel coordinate ((2c - 1) + 1) * (S / 2) -
// 0.5, written as grid_sample's CPU kernel computes it so that the results agree with it to rounding. Corners outside
// the map contribute zero; a NaN or infinite coordinate gives NaN, as in grid_sample.
#pragma once

#include <cmath>
#include <cstdint>

#include "ms_deform_attn/sampling.h"  // MPSEG_HOST_DEVICE, msda::Bilinear, msda::bilinear_setup_pixel

namespace mpseg {
namespace points {

// The pixel coordinate of normalised coordinate c on a canvas of canvas_size pixels (the formula at the top).
template <typename T>
MPSEG_HOST_DEVICE inline T unnormalise(T c, int64_t canvas_size) {
  return ((static_cast<T>(2) * c - static_cast<T>(1)) + static_cast<T>(1)) *
             (static_cast<T>(canvas_size) / static_cast<T>(2)) -
         static_cast<T>(0.5);
}

// The bilinear value of map[height x width] (row-major; bool, integer or floating point) at one point, summed corner by
// corner in a fixed order. Points whose four corners are all inside the map (most of them) take a branch-free path
// with the same arithmetic, hence the same bits.
template <typename T, typename map_t>
MPSEG_HOST_DEVICE inline T bilinear(const map_t* map, T cx, T cy, int64_t height, int64_t width, int64_t canvas_h,
                                    int64_t canvas_w) {
  if (!(cx - cx == static_cast<T>(0) && cy - cy == static_cast<T>(0))) {
    return static_cast<T>(NAN);  // a NaN or infinite coordinate: NaN, as grid_sample gives (and the PyTorch path)
  }
  const T x = unnormalise(cx, canvas_w);
  const T y = unnormalise(cy, canvas_h);
  if (x >= static_cast<T>(0) && y >= static_cast<T>(0) && x < static_cast<T>(width - 1) &&
      y < static_cast<T>(height - 1)) {
    const int64_t x0 = static_cast<int64_t>(x);  // x >= 0: truncation is floor
    const int64_t y0 = static_cast<int64_t>(y);
    if (x0 + 1 < width && y0 + 1 < height) {  // the float test above can round for sizes beyond 2^24
      const T lx = x - static_cast<T>(x0);
      const T ly = y - static_cast<T>(y0);
      const T hx = static_cast<T>(1) - lx;
      const T hy = static_cast<T>(1) - ly;
      const map_t* p = map + y0 * width + x0;
      T total = static_cast<T>(0);
      total += static_cast<T>(p[0]) * (hx * hy);
      total += static_cast<T>(p[1]) * (lx * hy);
      total += static_cast<T>(p[width]) * (hx * ly);
      total += static_cast<T>(p[width + 1]) * (lx * ly);
      return total;
    }
  }
  // Near the border (or off the map): the corner logic of multi-scale deformable attention, on this pixel coordinate.
  msda::Bilinear<T> s;
  if (!msda::bilinear_setup_pixel(x, y, height, width, s)) return static_cast<T>(0);
  T total = static_cast<T>(0);
  for (int i = 0; i < 4; ++i) {
    if (s.valid[i]) total += static_cast<T>(map[s.index[i]]) * s.weight[i];
  }
  return total;
}

// Selection key of a point: Mask2Former's uncertainty -|logit| (highest at the decision boundary). NaN logits get
// +inf, above every real uncertainty (which is <= 0), as torch.topk ranks NaN above every number.
// (std::fabs, not a comparison: -|-0.0| is -0.0 like -|0.0|, so equal keys also have equal bits.)
template <typename T>
MPSEG_HOST_DEVICE inline T uncertainty_key(T logit) {
  const T u = -std::fabs(logit);
  return u != u ? static_cast<T>(INFINITY) : u;
}

}  // namespace points
}  // namespace mpseg
