// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// Input checks shared by the CPU and CUDA kernels of mpseg::_sample_masks_at_points and
// mpseg::_select_uncertain_points. The Python wrappers (mpseg/ops/point_sampling.py) check the same things with the
// public argument names first; these checks guard direct calls so that no input can make a kernel read out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace mpseg {
namespace points {

struct MaskSizes {
  int64_t masks, height, width, rows, points;
  bool shared;  // one point set [P, 2] for every row
};

inline MaskSizes check_mask_inputs(const at::Tensor& masks, const at::Tensor& coords,
                                   const c10::optional<at::Tensor>& mask_index, int64_t canvas_h, int64_t canvas_w) {
  TORCH_CHECK(masks.dim() == 3, "_sample_masks_at_points: masks must be [N, H, W], got shape ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == at::kBool || at::isIntegralType(masks.scalar_type(), false) ||
                  at::isFloatingType(masks.scalar_type()),
              "_sample_masks_at_points: masks must be bool, integer or floating point, got ", masks.scalar_type());
  TORCH_CHECK(coords.scalar_type() == at::kFloat || coords.scalar_type() == at::kDouble,
              "_sample_masks_at_points: coords must be float32 or float64, got ", coords.scalar_type());
  TORCH_CHECK((coords.dim() == 2 || coords.dim() == 3) && coords.size(-1) == 2,
              "_sample_masks_at_points: coords must be [P, 2] or [R, P, 2], got shape ", coords.sizes());
  TORCH_CHECK(coords.device() == masks.device(), "_sample_masks_at_points: coords must be on masks' device ",
              masks.device(), ", got ", coords.device());
  MaskSizes n{masks.size(0), masks.size(1), masks.size(2), masks.size(0), coords.size(-2), coords.dim() == 2};
  TORCH_CHECK(canvas_h >= n.height && canvas_w >= n.width, "_sample_masks_at_points: the canvas (", canvas_h, ", ",
              canvas_w, ") must be at least the mask size (", n.height, ", ", n.width, ")");
  if (mask_index.has_value()) {
    const at::Tensor& index = *mask_index;
    TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong,
                "_sample_masks_at_points: mask_index must be int64 [R], got ", index.scalar_type(), " of shape ",
                index.sizes());
    TORCH_CHECK(index.device() == masks.device(), "_sample_masks_at_points: mask_index must be on masks' device ",
                masks.device(), ", got ", index.device());
    TORCH_CHECK(!n.shared, "_sample_masks_at_points: mask_index needs per-row coords [R, P, 2], got shape ",
                coords.sizes());
    n.rows = index.size(0);
  }
  if (!n.shared) {
    TORCH_CHECK(coords.size(0) == n.rows, "_sample_masks_at_points: coords [R, P, 2] must have R = ", n.rows,
                " rows (masks.size(0), or mask_index's length), got shape ", coords.sizes());
  }
  return n;
}

struct SelectSizes {
  int64_t masks, height, width, candidates, keep;
};

inline SelectSizes check_select_inputs(const at::Tensor& logits, const at::Tensor& coords, int64_t keep) {
  TORCH_CHECK(logits.dim() == 3, "_select_uncertain_points: logits must be [N, H, W], got shape ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "_select_uncertain_points: logits must be float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK(coords.scalar_type() == at::kFloat || coords.scalar_type() == at::kDouble,
              "_select_uncertain_points: coords must be float32 or float64, got ", coords.scalar_type());
  TORCH_CHECK(coords.dim() == 3 && coords.size(0) == logits.size(0) && coords.size(2) == 2,
              "_select_uncertain_points: coords must be [N, S, 2] with N = ", logits.size(0), ", got shape ",
              coords.sizes());
  TORCH_CHECK(coords.device() == logits.device(), "_select_uncertain_points: coords must be on logits' device ",
              logits.device(), ", got ", coords.device());
  TORCH_CHECK(keep >= 0 && keep <= coords.size(1), "_select_uncertain_points: k must be in [0, S] = [0, ",
              coords.size(1), "], got ", keep);
  return {logits.size(0), logits.size(1), logits.size(2), coords.size(1), keep};
}

}  // namespace points
}  // namespace mpseg
