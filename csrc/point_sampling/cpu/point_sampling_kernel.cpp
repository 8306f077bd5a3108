// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// CPU kernels of the point lookups of the mask losses. Per-point arithmetic comes from ../sampling.h (shared with
// CUDA); this file owns the loops and the per-row selection.
//
// - _sample_masks_at_points: bilinear values of (binary) target masks at points, read in the masks' own dtype (no
//   float copy of the masks). Every output element is independent: parallel over rows x points.
// - _select_uncertain_points: PointRend's choice of the k most uncertain of S candidate points per mask. One row per
//   task: the uncertainties of the S candidates as order-preserving unsigned integers, a histogram of their top 11
//   bits that finds the bin holding the k-th largest, std::nth_element inside that bin only, and one pass that keeps
//   the points above the k-th largest plus the first ones equal to it, in candidate order. O(S) per row with few
//   unpredictable branches, where torch.topk partially sorts (value, index) pairs of the whole row.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/core/Dispatch_v2.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "point_sampling/point_sampling.h"
#include "point_sampling/sampling.h"

namespace mpseg {
namespace points {
namespace {

Tensor sample_masks_at_points_cpu(const Tensor& masks_in, const Tensor& coords_in,
                                      const std::optional<Tensor>& mask_index_in, int64_t canvas_h,
                                      int64_t canvas_w) {
  const MaskSizes n = check_mask_inputs(masks_in, coords_in, mask_index_in, canvas_h, canvas_w);
  const Tensor masks = torch::stable::contiguous(masks_in);
  const Tensor coords = torch::stable::contiguous(coords_in);
  std::optional<Tensor> mask_index;
  if (mask_index_in.has_value()) {
    mask_index = torch::stable::contiguous(*mask_index_in);
    const int64_t* index = mask_index->const_data_ptr<int64_t>();
    for (int64_t r = 0; r < n.rows; ++r) {
      MPSEG_CHECK(index[r] >= 0 && index[r] < n.masks, "_sample_masks_at_points: mask_index[", r, "] = ", index[r],
                  " is out of range for ", n.masks, " masks");
    }
  }
  Tensor output = zeros(coords, {n.rows, n.points}, coords.scalar_type());
  if (n.rows == 0 || n.points == 0 || n.height * n.width == 0) return output;
  const int64_t* index = mask_index.has_value() ? mask_index->const_data_ptr<int64_t>() : nullptr;
  const int64_t plane = n.height * n.width;
  THO_DISPATCH_V2(coords.scalar_type(), "_sample_masks_at_points_cpu", AT_WRAP([&] {
    using coord_t = scalar_t;
    const coord_t* xy = coords.const_data_ptr<coord_t>();
    coord_t* out = output.mutable_data_ptr<coord_t>();
    THO_DISPATCH_V2(masks.scalar_type(), "_sample_masks_cpu", AT_WRAP([&] {
      const scalar_t* data = masks.const_data_ptr<scalar_t>();
      torch::stable::parallel_for(0, n.rows * n.points, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t r = i / n.points;
          const int64_t p = i % n.points;
          const coord_t* point = xy + 2 * (n.shared ? p : i);
          const scalar_t* map = data + (index != nullptr ? index[r] : r) * plane;
          out[i] = bilinear<coord_t>(map, point[0], point[1], n.height, n.width, canvas_h, canvas_w);
        }
      });
    }), AT_ALL_TYPES, ScalarType::Bool, ScalarType::Half, ScalarType::BFloat16);
  }), AT_FLOATING_TYPES);
  return output;
}

// Unsigned integers that order like the floats they come from (non-NaN, +0.0 never occurring as a key): flip every
// bit of a negative number, only the sign bit of a positive one.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

template <typename T>
inline Bits<T> ordered_bits(T key) {
  Bits<T> bits;
  std::memcpy(&bits, &key, sizeof(bits));
  constexpr Bits<T> sign = Bits<T>(1) << (8 * sizeof(T) - 1);
  return (bits & sign) ? ~bits : (bits | sign);
}

constexpr int kHistogramBits = 11;

template <typename U>
constexpr int histogram_bin(U key) {
  return static_cast<int>(key >> (8 * sizeof(U) - kHistogramBits));
}

// Writes to `out` (candidate order) the coordinates of the `keep` largest keys; among keys equal to the keep-th
// largest, the first ones. `histogram` counts the keys by histogram_bin; `scratch` is caller-owned working memory.
template <typename U, typename coord_t>
void keep_largest(const std::vector<U>& keys, const std::array<int64_t, (1 << kHistogramBits)>& histogram,
                  int64_t keep, const coord_t* coords, coord_t* out, std::vector<U>& scratch) {
  int64_t above = 0;  // keys in the bins above the boundary bin, which holds the keep-th largest
  int bin = (1 << kHistogramBits) - 1;
  while (above + histogram[bin] < keep) above += histogram[bin--];
  scratch.clear();
  for (const U key : keys) {
    if (histogram_bin(key) == bin) scratch.push_back(key);
  }
  const int64_t rank = keep - above - 1;  // of the threshold inside the boundary bin, largest first
  std::nth_element(scratch.begin(), scratch.begin() + rank, scratch.end(), std::greater<U>());
  const U threshold = scratch[rank];
  int64_t ties = keep - above;  // how many keys equal to the threshold to keep
  for (int64_t i = 0; i < rank; ++i) ties -= scratch[i] > threshold;
  // Branch-free (a kept point is a coin flip for the branch predictor): every candidate is written to the next free
  // slot, which only advances when the candidate is kept. The loop ends once `keep` points are in, so it never writes
  // past the end.
  int64_t kept = 0;
  const int64_t candidates = static_cast<int64_t>(keys.size());
  for (int64_t s = 0; s < candidates && kept < keep; ++s) {
    const bool tie = keys[s] == threshold;
    const bool take = (keys[s] > threshold) | (tie & (ties > 0));
    ties -= tie & take;
    out[2 * kept] = coords[2 * s];
    out[2 * kept + 1] = coords[2 * s + 1];
    kept += take;
  }
  MPSEG_CHECK(kept == keep, "_select_uncertain_points: selected ", kept, " of ", keep);
}

Tensor select_uncertain_points_cpu(const Tensor& logits_in, const Tensor& coords_in, int64_t keep) {
  const SelectSizes n = check_select_inputs(logits_in, coords_in, keep);
  const Tensor logits = torch::stable::contiguous(logits_in);
  const Tensor coords = torch::stable::contiguous(coords_in);
  Tensor output = empty(coords, {n.masks, n.keep, 2}, coords.scalar_type());
  if (n.masks == 0 || n.keep == 0) return output;
  THO_DISPATCH_V2(logits.scalar_type(), "_select_uncertain_points_cpu", AT_WRAP([&] {
    using logit_t = scalar_t;
    const logit_t* maps = logits.const_data_ptr<logit_t>();
    THO_DISPATCH_V2(coords.scalar_type(), "_select_uncertain_points_cpu_coords", AT_WRAP([&] {
      const scalar_t* xy = coords.const_data_ptr<scalar_t>();
      scalar_t* out = output.mutable_data_ptr<scalar_t>();
      const int64_t plane = n.height * n.width;
      torch::stable::parallel_for(0, n.masks, 1, [&](int64_t begin, int64_t end) {
        std::vector<Bits<logit_t>> keys(n.candidates), scratch;
        std::array<int64_t, (1 << kHistogramBits)> histogram;
        scratch.reserve(n.candidates);
        for (int64_t m = begin; m < end; ++m) {
          const scalar_t* row = xy + m * n.candidates * 2;
          for (int64_t s = 0; s < n.candidates; ++s) {
            // As point_sample does, the coordinates are first converted to the logits' dtype.
            const logit_t value = plane == 0 ? logit_t(0)
                                             : bilinear<logit_t>(maps + m * plane, static_cast<logit_t>(row[2 * s]),
                                                                 static_cast<logit_t>(row[2 * s + 1]), n.height,
                                                                 n.width, n.height, n.width);
            keys[s] = ordered_bits(uncertainty_key(value));
          }
          // A separate pass: counting inside the loop above makes it slower (dependent read-modify-writes).
          histogram.fill(0);
          for (const auto key : keys) ++histogram[histogram_bin(key)];
          keep_largest(keys, histogram, n.keep, row, out + m * n.keep * 2, scratch);
        }
      });
    }), AT_FLOATING_TYPES);
  }), AT_FLOATING_TYPES);
  return output;
}

}  // namespace
}  // namespace points
}  // namespace mpseg

STABLE_TORCH_LIBRARY_IMPL(mpseg, CPU, m) {
  m.impl("_sample_masks_at_points", TORCH_BOX(&mpseg::points::sample_masks_at_points_cpu));
  m.impl("_select_uncertain_points", TORCH_BOX(&mpseg::points::select_uncertain_points_cpu));
}
