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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

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

at::Tensor sample_masks_at_points_cuda(const at::Tensor& masks_in, const at::Tensor& coords_in,
                                       const c10::optional<at::Tensor>& mask_index_in, int64_t canvas_h,
                                       int64_t canvas_w) {
  const MaskSizes n = check_mask_inputs(masks_in, coords_in, mask_index_in, canvas_h, canvas_w);
  const c10::cuda::CUDAGuard guard(masks_in.device());
  const at::Tensor masks = masks_in.contiguous();
  const at::Tensor coords = coords_in.contiguous();
  const at::Tensor mask_index = mask_index_in.has_value() ? mask_index_in->contiguous() : at::Tensor();
  at::Tensor output = at::zeros({n.rows, n.points}, coords.options());
  if (n.rows == 0 || n.points == 0 || n.height * n.width == 0) return output;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "_sample_masks_at_points_cuda", [&] {
    using coord_t = scalar_t;
    AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, masks.scalar_type(), "_sample_masks_cuda", [&] {
      sample_masks_kernel<coord_t, scalar_t><<<blocks_for(output.numel()), kThreads, 0, stream>>>(
          masks.data_ptr<scalar_t>(), coords.data_ptr<coord_t>(),
          mask_index.defined() ? mask_index.data_ptr<int64_t>() : nullptr, output.data_ptr<coord_t>(), n, canvas_h,
          canvas_w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return output;
}

at::Tensor select_uncertain_points_cuda(const at::Tensor& logits_in, const at::Tensor& coords_in, int64_t keep) {
  const SelectSizes n = check_select_inputs(logits_in, coords_in, keep);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor coords = coords_in.contiguous();
  if (n.masks == 0 || n.keep == 0) return at::empty({n.masks, n.keep, 2}, coords.options());
  at::Tensor keys = at::empty({n.masks, n.candidates}, logits.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "_select_uncertain_points_cuda", [&] {
    using logit_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "_select_uncertain_points_cuda_coords", [&] {
      uncertainty_kernel<logit_t, scalar_t><<<blocks_for(keys.numel()), kThreads, 0, stream>>>(
          logits.data_ptr<logit_t>(), coords.data_ptr<scalar_t>(), keys.data_ptr<logit_t>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const at::Tensor kept = std::get<0>(at::sort(std::get<1>(at::topk(keys, n.keep, 1, true, false)), 1));
  return coords.gather(1, kept.unsqueeze(-1).expand({n.masks, n.keep, 2}));
}

}  // namespace
}  // namespace points
}  // namespace mpseg

TORCH_LIBRARY_IMPL(mpseg, CUDA, m) {
  m.impl("_sample_masks_at_points", &mpseg::points::sample_masks_at_points_cuda);
  m.impl("_select_uncertain_points", &mpseg::points::select_uncertain_points_cuda);
}
