// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// CUDA kernels of the point lookups of the mask losses. The per-point arithmetic is ../sampling.h, the same
// __host__ __device__ code the CPU kernels run; this file maps it onto threads (one thread per point, grid-stride).
//
// - _sample_masks_at_points: one thread per output value. mask_index stays on the device (no host sync): a row whose
//   index is out of range reads zeros here (the Python wrapper rejects such an index before the call; the CPU kernel
//   raises), so no input can make the kernel read out of bounds.
// - _select_uncertain_points: one thread per candidate computes its uncertainty key, then torch.topk picks the k
//   largest per row and the kept indices are sorted, so that the points come back in candidate order as on the CPU.
//   Among candidates tied at the k-th key, topk decides which are kept (the CPU kernel keeps the first ones).
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/core/Dispatch_v2.h>

#include <algorithm>
#include <array>
#include <vector>

#include "cuda_stable.h"
#include "point_sampling/point_sampling.h"
#include "point_sampling/sampling.h"

namespace mpseg {
namespace points {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 20)));
}

template <typename coord_t, typename mask_t>
__global__ void sample_masks_kernel(const mask_t* __restrict__ masks, const coord_t* __restrict__ coords,
                                    const int64_t* __restrict__ mask_index, coord_t* __restrict__ out, MaskSizes n,
                                    int64_t canvas_h, int64_t canvas_w) {
  const int64_t total = n.rows * n.points;
  const int64_t plane = n.height * n.width;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / n.points;
    const int64_t p = i % n.points;
    const int64_t m = mask_index != nullptr ? mask_index[r] : r;
    if (m < 0 || m >= n.masks) {
      out[i] = coord_t(0);
      continue;
    }
    const coord_t* point = coords + 2 * (n.shared ? p : i);
    out[i] = bilinear<coord_t>(masks + m * plane, point[0], point[1], n.height, n.width, canvas_h, canvas_w);
  }
}

template <typename logit_t, typename coord_t>
__global__ void uncertainty_kernel(const logit_t* __restrict__ logits, const coord_t* __restrict__ coords,
                                   logit_t* __restrict__ keys, SelectSizes n) {
  const int64_t total = n.masks * n.candidates;
  const int64_t plane = n.height * n.width;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / n.candidates;
    const logit_t value = plane == 0 ? logit_t(0)
                                     : bilinear<logit_t>(logits + m * plane, static_cast<logit_t>(coords[2 * i]),
                                                         static_cast<logit_t>(coords[2 * i + 1]), n.height, n.width,
                                                         n.height, n.width);
    keys[i] = uncertainty_key(value);
  }
}

Tensor sample_masks_at_points_cuda(const Tensor& masks_in, const Tensor& coords_in,
                                   const std::optional<Tensor>& mask_index_in, int64_t canvas_h, int64_t canvas_w) {
  const MaskSizes n = check_mask_inputs(masks_in, coords_in, mask_index_in, canvas_h, canvas_w);
  const torch::stable::accelerator::DeviceGuard guard(masks_in.get_device_index());
  const Tensor masks = torch::stable::contiguous(masks_in);
  const Tensor coords = torch::stable::contiguous(coords_in);
  std::optional<Tensor> mask_index;
  if (mask_index_in.has_value()) mask_index = torch::stable::contiguous(*mask_index_in);
  Tensor output = zeros(coords, {n.rows, n.points}, coords.scalar_type());
  if (n.rows == 0 || n.points == 0 || n.height * n.width == 0) return output;
  const cudaStream_t stream = current_stream(masks_in.get_device_index());
  const int64_t* index = mask_index.has_value() ? mask_index->const_data_ptr<int64_t>() : nullptr;
  THO_DISPATCH_V2(coords.scalar_type(), "_sample_masks_at_points_cuda", AT_WRAP([&] {
    using coord_t = scalar_t;
    THO_DISPATCH_V2(masks.scalar_type(), "_sample_masks_cuda", AT_WRAP([&] {
      launch_kernel(sample_masks_kernel<coord_t, scalar_t>, blocks_for(output.numel()), kThreads, stream,
                    masks.const_data_ptr<scalar_t>(), coords.const_data_ptr<coord_t>(), index,
                    output.mutable_data_ptr<coord_t>(), n, canvas_h, canvas_w);
    }), AT_ALL_TYPES, ScalarType::Bool, ScalarType::Half, ScalarType::BFloat16);
  }), AT_FLOATING_TYPES);
  return output;
}

// An ATen op through the stable dispatcher call; the outputs replace the arguments at the front of the stack.
template <size_t N>
void call_aten(const char* name, const char* overload, std::array<StableIValue, N>& stack) {
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
}

using torch::stable::detail::from;
using torch::stable::detail::to;

Tensor select_uncertain_points_cuda(const Tensor& logits_in, const Tensor& coords_in, int64_t keep) {
  const SelectSizes n = check_select_inputs(logits_in, coords_in, keep);
  const torch::stable::accelerator::DeviceGuard guard(logits_in.get_device_index());
  const Tensor logits = torch::stable::contiguous(logits_in);
  const Tensor coords = torch::stable::contiguous(coords_in);
  if (n.masks == 0 || n.keep == 0) return empty(coords, {n.masks, n.keep, 2}, coords.scalar_type());
  Tensor keys = empty(logits, {n.masks, n.candidates}, logits.scalar_type());
  const cudaStream_t stream = current_stream(logits_in.get_device_index());
  THO_DISPATCH_V2(logits.scalar_type(), "_select_uncertain_points_cuda", AT_WRAP([&] {
    using logit_t = scalar_t;
    THO_DISPATCH_V2(coords.scalar_type(), "_select_uncertain_points_cuda_coords", AT_WRAP([&] {
      launch_kernel(uncertainty_kernel<logit_t, scalar_t>, blocks_for(keys.numel()), kThreads, stream,
                    logits.const_data_ptr<logit_t>(), coords.const_data_ptr<scalar_t>(),
                    keys.mutable_data_ptr<logit_t>(), n);
    }), AT_FLOATING_TYPES);
  }), AT_FLOATING_TYPES);
  // kept = sort(topk(keys, k, dim=1, largest, unsorted).indices, dim=1).values; coords.gather(1, kept[..., None]
  // expanded to [N, k, 2]). Every returned tensor is taken over (to<Tensor>) so that none leaks.
  std::array<StableIValue, 5> topk{from(keys), from(n.keep), from(int64_t{1}), from(true), from(false)};
  call_aten("aten::topk", "", topk);
  const Tensor top_values = to<Tensor>(topk[0]);
  const Tensor top_indices = to<Tensor>(topk[1]);
  std::array<StableIValue, 3> sort{from(top_indices), from(int64_t{1}), from(false)};
  call_aten("aten::sort", "", sort);
  const Tensor kept = to<Tensor>(sort[0]);
  const Tensor sort_indices = to<Tensor>(sort[1]);
  const std::vector<int64_t> expanded{n.masks, n.keep, 2};
  std::array<StableIValue, 3> expand{from(torch::stable::unsqueeze(kept, -1)), from(Sizes64(expanded)), from(false)};
  call_aten("aten::expand", "", expand);
  const Tensor index = to<Tensor>(expand[0]);
  std::array<StableIValue, 4> gather{from(coords), from(int64_t{1}), from(index), from(false)};
  call_aten("aten::gather", "", gather);
  return to<Tensor>(gather[0]);
}

}  // namespace
}  // namespace points
}  // namespace mpseg

STABLE_TORCH_LIBRARY_IMPL(mpseg, CUDA, m) {
  m.impl("_sample_masks_at_points", TORCH_BOX(&mpseg::points::sample_masks_at_points_cuda));
  m.impl("_select_uncertain_points", TORCH_BOX(&mpseg::points::select_uncertain_points_cuda));
}
