// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// Input checks shared by the CPU and CUDA kernels of mpseg::_sample_masks_at_points and
// mpseg::_select_uncertain_points. The Python wrappers (mpseg/ops/point_sampling.py) check the same things with the
// public argument names first; these checks guard direct calls so that no input can make a kernel read out of bounds.
#pragma once

#include <cstdint>
#include <optional>

#include "stable_api.h"

namespace mpseg {
namespace points {

struct MaskSizes {
  int64_t masks, height, width, rows, points;
  bool shared;  // one point set [P, 2] for every row
};

inline MaskSizes check_mask_inputs(const Tensor& masks, const Tensor& coords,
                                   const std::optional<Tensor>& mask_index, int64_t canvas_h, int64_t canvas_w) {
  MPSEG_CHECK(masks.dim() == 3, "_sample_masks_at_points: masks must be [N, H, W], got shape ", shape_of(masks));
  MPSEG_CHECK(masks.scalar_type() == ScalarType::Bool || is_integral(masks.scalar_type()) ||
                  is_floating(masks.scalar_type()),
              "_sample_masks_at_points: masks must be bool, integer or floating point, got ", masks.scalar_type());
  MPSEG_CHECK(coords.scalar_type() == ScalarType::Float || coords.scalar_type() == ScalarType::Double,
              "_sample_masks_at_points: coords must be float32 or float64, got ", coords.scalar_type());
  MPSEG_CHECK((coords.dim() == 2 || coords.dim() == 3) && coords.size(-1) == 2,
              "_sample_masks_at_points: coords must be [P, 2] or [R, P, 2], got shape ", shape_of(coords));
  MPSEG_CHECK(same_device(coords, masks), "_sample_masks_at_points: coords must be on masks' device ",
              device_of(masks), ", got ", device_of(coords));
  MaskSizes n{masks.size(0), masks.size(1), masks.size(2), masks.size(0), coords.size(-2), coords.dim() == 2};
  MPSEG_CHECK(canvas_h >= n.height && canvas_w >= n.width, "_sample_masks_at_points: the canvas (", canvas_h, ", ",
              canvas_w, ") must be at least the mask size (", n.height, ", ", n.width, ")");
  if (mask_index.has_value()) {
    const Tensor& index = *mask_index;
    MPSEG_CHECK(index.dim() == 1 && index.scalar_type() == ScalarType::Long,
                "_sample_masks_at_points: mask_index must be int64 [R], got ", index.scalar_type(), " of shape ",
                shape_of(index));
    MPSEG_CHECK(same_device(index, masks), "_sample_masks_at_points: mask_index must be on masks' device ",
                device_of(masks), ", got ", device_of(index));
    MPSEG_CHECK(!n.shared, "_sample_masks_at_points: mask_index needs per-row coords [R, P, 2], got shape ",
                shape_of(coords));
    n.rows = index.size(0);
  }
  if (!n.shared) {
    MPSEG_CHECK(coords.size(0) == n.rows, "_sample_masks_at_points: coords [R, P, 2] must have R = ", n.rows,
                " rows (masks.size(0), or mask_index's length), got shape ", shape_of(coords));
  }
  return n;
}

struct SelectSizes {
  int64_t masks, height, width, candidates, keep;
};

inline SelectSizes check_select_inputs(const Tensor& logits, const Tensor& coords, int64_t keep) {
  MPSEG_CHECK(logits.dim() == 3, "_select_uncertain_points: logits must be [N, H, W], got shape ", shape_of(logits));
  MPSEG_CHECK(logits.scalar_type() == ScalarType::Float || logits.scalar_type() == ScalarType::Double,
              "_select_uncertain_points: logits must be float32 or float64, got ", logits.scalar_type());
  MPSEG_CHECK(coords.scalar_type() == ScalarType::Float || coords.scalar_type() == ScalarType::Double,
              "_select_uncertain_points: coords must be float32 or float64, got ", coords.scalar_type());
  MPSEG_CHECK(coords.dim() == 3 && coords.size(0) == logits.size(0) && coords.size(2) == 2,
              "_select_uncertain_points: coords must be [N, S, 2] with N = ", logits.size(0), ", got shape ",
              shape_of(coords));
  MPSEG_CHECK(same_device(coords, logits), "_select_uncertain_points: coords must be on logits' device ",
              device_of(logits), ", got ", device_of(coords));
  MPSEG_CHECK(keep >= 0 && keep <= coords.size(1), "_select_uncertain_points: k must be in [0, S] = [0, ",
              coords.size(1), "], got ", keep);
  return {logits.size(0), logits.size(1), logits.size(2), coords.size(1), keep};
}

}  // namespace points
}  // namespace mpseg
