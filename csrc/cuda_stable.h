// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// What the CUDA kernels need beyond stable_api.h, through PyTorch's stable C shims only: the current CUDA stream of a
// device and a launch check. (torch::stable::accelerator::Stream exposes its cudaStream_t only from torch 2.13 on;
// aoti_torch_get_current_cuda_stream exists in every torch this extension supports.)
#pragma once

#ifndef USE_CUDA
#error "compile the CUDA sources with -DUSE_CUDA (torch's shim.h declares its CUDA calls under it; see _build_config.py)"
#endif

#include <cuda_runtime.h>

#include <utility>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include "stable_api.h"

namespace mpseg {

inline cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  MPSEG_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream) == AOTI_TORCH_SUCCESS,
              "mpseg: cannot get the current CUDA stream of device ", device_index);
  return static_cast<cudaStream_t>(stream);
}

// After a kernel launch: a bad configuration (or an earlier asynchronous error) becomes a RuntimeError.
inline void check_launch() {
  const cudaError_t error = cudaGetLastError();
  MPSEG_CHECK(error == cudaSuccess, "mpseg: CUDA kernel launch failed: ", cudaGetErrorString(error));
}

// kernel<<<blocks, threads, 0, stream>>>(args...) and the launch check. A function, so that a launch can sit inside
// THO_DISPATCH_V2's body: the commas of <<<...>>> would split the macro's arguments, those inside parentheses do not.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int blocks, int threads, cudaStream_t stream, Args&&... args) {
  kernel<<<blocks, threads, 0, stream>>>(std::forward<Args>(args)...);
  check_launch();
}

}  // namespace mpseg
