// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// Input checks shared by the CPU and CUDA kernels of mpseg::ms_deform_attn. The Python wrapper checks the same things
// with friendlier wording before dispatch; these checks guard direct calls (torch.ops.mpseg.*) so that no input can
// make a kernel read or write out of bounds.
#pragma once

#include <cstdint>
#include <vector>

#include "stable_api.h"

namespace mpseg {
namespace msda {

// The tensor inputs of one call made contiguous (the kernels index them as dense arrays; a contiguous tensor is not
// copied). One place for the CPU and CUDA forward and backward.
struct DenseInputs {
  Tensor value, shapes, starts, locations, weights;
  DenseInputs(const Tensor& value_, const Tensor& spatial_shapes, const Tensor& level_start_index,
              const Tensor& sampling_locations, const Tensor& attention_weights)
      : value(torch::stable::contiguous(value_)),
        shapes(torch::stable::contiguous(spatial_shapes)),
        starts(torch::stable::contiguous(level_start_index)),
        locations(torch::stable::contiguous(sampling_locations)),
        weights(torch::stable::contiguous(attention_weights)) {}
};

// Sizes of one call: value [B, S, M, D], sampling_locations [B, Q, M, L, P, 2], attention_weights [B, Q, M, L, P].
struct Sizes {
  int64_t batch, rows, heads, channels, queries, levels, points;
};

inline Sizes check_inputs(const Tensor& value, const Tensor& spatial_shapes,
                          const Tensor& level_start_index, const Tensor& sampling_locations,
                          const Tensor& attention_weights) {
  MPSEG_CHECK(value.dim() == 4, "ms_deform_attn: value must be 4-d [B, S, M, D], got shape ", shape_of(value));
  MPSEG_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [B, Q, M, L, P, 2], got shape ", shape_of(sampling_locations));
  MPSEG_CHECK(attention_weights.dim() == 5, "ms_deform_attn: attention_weights must be 5-d [B, Q, M, L, P], got shape ",
              shape_of(attention_weights));
  MPSEG_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be [L, 2], got shape ", shape_of(spatial_shapes));
  MPSEG_CHECK(level_start_index.dim() == 1, "ms_deform_attn: level_start_index must be 1-d [L], got shape ",
              shape_of(level_start_index));
  const Sizes n{value.size(0), value.size(1), value.size(2), value.size(3), sampling_locations.size(1),
                sampling_locations.size(3), sampling_locations.size(4)};
  const std::vector<int64_t> expected_locations{n.batch, n.queries, n.heads, n.levels, n.points, 2};
  MPSEG_CHECK(sampling_locations.sizes() == Sizes64(expected_locations),
              "ms_deform_attn: sampling_locations must be [B, Q, M, L, P, 2] = ", Shape{Sizes64(expected_locations)},
              " (B, M from value), got ", shape_of(sampling_locations));
  const std::vector<int64_t> expected_weights{n.batch, n.queries, n.heads, n.levels, n.points};
  MPSEG_CHECK(attention_weights.sizes() == Sizes64(expected_weights),
              "ms_deform_attn: attention_weights must be [B, Q, M, L, P] = ", Shape{Sizes64(expected_weights)},
              ", got ", shape_of(attention_weights));
  MPSEG_CHECK(spatial_shapes.size(0) == n.levels, "ms_deform_attn: spatial_shapes must have L = ", n.levels,
              " rows (the L of sampling_locations), got ", spatial_shapes.size(0));
  MPSEG_CHECK(level_start_index.size(0) == n.levels, "ms_deform_attn: level_start_index must have L = ", n.levels,
              " entries, got ", level_start_index.size(0));
  MPSEG_CHECK(is_floating(value.scalar_type()), "ms_deform_attn: value must be floating point, got ",
              value.scalar_type());
  MPSEG_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share one dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), " and ", attention_weights.scalar_type());
  MPSEG_CHECK(spatial_shapes.scalar_type() == ScalarType::Long && level_start_index.scalar_type() == ScalarType::Long,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64, got ", spatial_shapes.scalar_type(),
              " and ", level_start_index.scalar_type());
  const auto device = value.device();
  const DeviceName value_device = device_name(device);
  MPSEG_CHECK(sampling_locations.device() == device && attention_weights.device() == device &&
                  spatial_shapes.device() == device && level_start_index.device() == device,
              "ms_deform_attn: all inputs must be on one device, got value on ", value_device, ", sampling_locations on ",
              device_of(sampling_locations), ", attention_weights on ", device_of(attention_weights),
              ", spatial_shapes on ", device_of(spatial_shapes), ", level_start_index on ", device_of(level_start_index));
  return n;
}

// The forward's checks plus grad_output's: one place for both backends' backward.
inline Sizes check_backward_inputs(const Tensor& grad_output, const Tensor& value,
                                   const Tensor& spatial_shapes, const Tensor& level_start_index,
                                   const Tensor& sampling_locations, const Tensor& attention_weights) {
  const Sizes n = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const std::vector<int64_t> out_shape{n.batch, n.queries, n.heads * n.channels};
  MPSEG_CHECK(grad_output.sizes() == Sizes64(out_shape), "ms_deform_attn backward: grad_output must be ",
              Shape{Sizes64(out_shape)}, ", got ", shape_of(grad_output));
  MPSEG_CHECK(grad_output.scalar_type() == value.scalar_type() && grad_output.device() == value.device(),
              "ms_deform_attn backward: grad_output must match value's dtype and device, got ",
              grad_output.scalar_type(), " on ", device_of(grad_output));
  return n;
}

// The level metadata must describe value's S rows exactly. Only called where the metadata is host memory (CPU); the
// CUDA kernels skip inconsistent levels on the device instead (see level_in_bounds in sampling.h).
inline void check_levels_host(const Tensor& spatial_shapes, const Tensor& level_start_index, int64_t rows) {
  const int64_t* shapes = spatial_shapes.const_data_ptr<int64_t>();
  const int64_t* starts = level_start_index.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < spatial_shapes.size(0); ++l) {
    const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
    MPSEG_CHECK(h > 0 && w > 0, "ms_deform_attn: spatial_shapes[", l, "] must be positive (H, W), got (", h, ", ", w,
                ")");
    MPSEG_CHECK(starts[l] == total, "ms_deform_attn: level_start_index[", l, "] must be ", total,
                " (the sum of H*W of the earlier levels), got ", starts[l]);
    MPSEG_CHECK(h <= (rows - total) / w, "ms_deform_attn: spatial_shapes describe more rows than value has (S = ",
                rows, ") at level ", l);
    total += h * w;
  }
  MPSEG_CHECK(total == rows, "ms_deform_attn: spatial_shapes must add up to S = ", rows,
              " rows of value (sum of H*W), got ", total);
}

}  // namespace msda
}  // namespace mpseg
