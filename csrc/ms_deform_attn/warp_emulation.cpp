// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// The CUDA backward's decomposition, run on the CPU: a test-only op (mpseg::_ms_deform_attn_backward_warp_emulation)
// that walks the warps, passes and lanes of cuda/ms_deform_attn_kernel.cu's backward_kernel in order and calls the same
// per-lane code (warp_split, lane_corner_partials, sample_gradients in sampling.h), with the warp shuffles replaced by
// butterfly_sum_host (the same summation order) and atomicAdd by a plain add. No GPU has run the CUDA kernel in this
// project's CI; this op lets the CPU tests check everything of it but the shuffle and atomic instructions themselves
// against the float64 oracle (tests/test_cuda_decomposition.py).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/core/Dispatch_v2.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/sampling.h"

namespace mpseg {
namespace msda {
namespace {

struct PlainAdd {
  template <typename T>
  void operator()(T* address, T amount) const {
    *address += amount;
  }
};

template <typename scalar_t, typename index_t>
void emulate_backward(const scalar_t* grad_output, const scalar_t* value, const int64_t* shapes,
                      const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
                      acc_type<scalar_t>* grad_value, scalar_t* grad_locations, scalar_t* grad_weights,
                      const Sizes& sizes) {
  using opmath_t = acc_type<scalar_t>;
  const index_t rows = static_cast<index_t>(sizes.rows), heads = static_cast<index_t>(sizes.heads);
  const index_t channels = static_cast<index_t>(sizes.channels), queries = static_cast<index_t>(sizes.queries);
  const index_t points = static_cast<index_t>(sizes.points);
  const index_t tasks = static_cast<index_t>(sizes.batch * sizes.queries * sizes.heads);
  const index_t row_stride = heads * channels;
  const index_t samples = static_cast<index_t>(sizes.levels * sizes.points);
  const WarpSplit split = warp_split(sizes.channels);
  for (index_t task = 0; task < tasks; ++task) {  // one warp per task
    const index_t m = task % heads;
    const index_t b = task / (heads * queries);
    const scalar_t* g = grad_output + task * channels;
    for (index_t pass = 0; pass < samples; pass += split.samples) {
      // Per-lane state of the pass, as the kernel's registers.
      opmath_t dot[4][kWarpLanes] = {};
      Bilinear<opmath_t> s[kWarpLanes];
      bool active[kWarpLanes] = {};
      int64_t height[kWarpLanes] = {}, width[kWarpLanes] = {};
      opmath_t attention[kWarpLanes] = {};
      for (int lane = 0; lane < kWarpLanes; ++lane) {
        const int member = lane % split.group;
        const index_t j = pass + lane / split.group;
        if (j >= samples) continue;
        const index_t k = task * samples + j;
        const index_t l = j / points;
        height[lane] = shapes[2 * l];
        width[lane] = shapes[2 * l + 1];
        const int64_t start = starts[l];
        active[lane] = level_in_bounds(height[lane], width[lane], start, rows) &&
                       bilinear_setup(static_cast<opmath_t>(locations[2 * k]),
                                      static_cast<opmath_t>(locations[2 * k + 1]), height[lane], width[lane], s[lane]);
        if (!active[lane]) continue;
        attention[lane] = static_cast<opmath_t>(weights[k]);
        const index_t level_offset = (b * rows + static_cast<index_t>(start)) * row_stride + m * channels;
        opmath_t lane_dot[4];
        lane_corner_partials<index_t>(s[lane], attention[lane], g, value + level_offset, grad_value + level_offset,
                                      row_stride, channels, static_cast<index_t>(member),
                                      static_cast<index_t>(split.group), lane_dot, PlainAdd{});
        for (int c = 0; c < 4; ++c) dot[c][lane] = lane_dot[c];
      }
      for (int c = 0; c < 4; ++c) butterfly_sum_host(dot[c], split.group);
      for (int lane = 0; lane < kWarpLanes; lane += split.group) {  // each group's first lane writes
        const index_t j = pass + lane / split.group;
        if (j >= samples) continue;
        const index_t k = task * samples + j;
        opmath_t grad_attention = 0, grad_x = 0, grad_y = 0;
        if (active[lane]) {
          const opmath_t sums[4] = {dot[0][lane], dot[1][lane], dot[2][lane], dot[3][lane]};
          // The group's other lanes hold the same sums (the property the kernel relies on: any lane may write).
          for (int other = lane + 1; other < lane + split.group; ++other) {
            for (int c = 0; c < 4; ++c) {
              MPSEG_CHECK(dot[c][other] == sums[c], "warp emulation: lanes of one group disagree after the butterfly");
            }
          }
          sample_gradients(s[lane], sums, attention[lane], height[lane], width[lane], &grad_attention, &grad_x,
                           &grad_y);
        }
        grad_weights[k] = static_cast<scalar_t>(grad_attention);
        grad_locations[2 * k] = static_cast<scalar_t>(grad_x);
        grad_locations[2 * k + 1] = static_cast<scalar_t>(grad_y);
      }
    }
  }
}

// index_bits: 32 or 64 forces that index path (32 must fit, see fits_int32); 0 chooses as the CUDA op does.
std::tuple<Tensor, Tensor, Tensor> backward_warp_emulation(
    const Tensor& grad_output, const Tensor& value, const Tensor& spatial_shapes,
    const Tensor& level_start_index, const Tensor& sampling_locations, const Tensor& attention_weights,
    int64_t index_bits) {
  const Sizes n =
      check_backward_inputs(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  MPSEG_CHECK(value.is_cpu(), "_ms_deform_attn_backward_warp_emulation: CPU tensors only, got ",
              device_of(value));
  MPSEG_CHECK(index_bits == 0 || index_bits == 32 || index_bits == 64,
              "_ms_deform_attn_backward_warp_emulation: index_bits must be 0, 32 or 64, got ", index_bits);
  const int64_t total = n.batch * n.queries * n.heads * n.levels * n.points;
  const bool fits = fits_int32(value.numel(), total, grad_output.numel());
  MPSEG_CHECK(index_bits != 32 || fits, "_ms_deform_attn_backward_warp_emulation: sizes need 64-bit indices");
  const bool use_int32 = index_bits == 32 || (index_bits == 0 && fits);
  Tensor grad_value = zeros_like(value);
  Tensor grad_locations = zeros_like(sampling_locations);
  Tensor grad_weights = zeros_like(attention_weights);
  if (total == 0 || value.numel() == 0) return {grad_value, grad_locations, grad_weights};
  const Tensor g = torch::stable::contiguous(grad_output), v = torch::stable::contiguous(value), loc = torch::stable::contiguous(sampling_locations);
  const Tensor w = torch::stable::contiguous(attention_weights);
  const Tensor shapes = torch::stable::contiguous(spatial_shapes), starts = torch::stable::contiguous(level_start_index);
  THO_DISPATCH_V2(value.scalar_type(), "warp_emulation", AT_WRAP([&] {
    using opmath_t = acc_type<scalar_t>;
    const bool reduced = !(std::is_same_v<opmath_t, scalar_t>);  // parenthesised: a macro argument
    Tensor acc = reduced ? zeros(value, value.sizes(), scalar_type_of<opmath_t>())
                             : grad_value;
    auto run = [&](auto index) {
      (emulate_backward<scalar_t, decltype(index)>)(
          g.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
          starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
          acc.mutable_data_ptr<opmath_t>(), grad_locations.mutable_data_ptr<scalar_t>(),
          grad_weights.mutable_data_ptr<scalar_t>(), n);
    };
    if (use_int32) {
      run(int32_t{0});
    } else {
      run(int64_t{0});
    }
    if (reduced) torch::stable::copy_(grad_value, acc);
  }), AT_FLOATING_TYPES, ScalarType::Half, ScalarType::BFloat16);
  return {grad_value, grad_locations, grad_weights};
}

// Which lanes a warp gives each sample, and whether a call's offsets fit int32: the two launch decisions of the CUDA
// backward, for the tests. Returns [group, samples per pass, fits_int32].
std::vector<int64_t> warp_plan(int64_t channels, int64_t value_elements, int64_t samples, int64_t output_elements) {
  const WarpSplit split = warp_split(channels);
  return {split.group, split.samples, fits_int32(value_elements, samples, output_elements) ? 1 : 0};
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(mpseg, m) {
  // Test-only (see the top of this file). Like the CUDA op, the emulation does not check the level metadata against
  // value on the host; level_in_bounds keeps every read and write inside value.
  m.def(
      "_ms_deform_attn_backward_warp_emulation(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights, int index_bits) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("_ms_deform_attn_warp_plan(int channels, int value_elements, int samples, int output_elements) -> int[]");
}

STABLE_TORCH_LIBRARY_IMPL(mpseg, CPU, m) {
  m.impl("_ms_deform_attn_backward_warp_emulation", TORCH_BOX(&backward_warp_emulation));
}

// No tensor argument: one kernel for every backend.
STABLE_TORCH_LIBRARY_IMPL(mpseg, CompositeExplicitAutograd, m) {
  m.impl("_ms_deform_attn_warp_plan", TORCH_BOX(&warp_plan));
}

}  // namespace msda
}  // namespace mpseg
