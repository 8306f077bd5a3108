// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// The AVX2 copy of the CPU kernels of mpseg::ms_deform_attn (ms_deform_attn_avx2.cpp), chosen at run time by
// ms_deform_attn_kernel.cpp. Same signatures and the same results, bit for bit, as the baseline loops there (see the
// comment at the top of ms_deform_attn_avx2.cpp for why that holds).
#pragma once

#include <cstdint>

#include "ms_deform_attn/ms_deform_attn.h"

namespace mpseg {
namespace msda {
namespace avx2 {

// Whether the AVX2 copy is compiled in and this CPU has AVX2 and F16C (detected once), and the environment does not
// force the baseline loops (MPSEG_CPU_KERNEL=generic, read at every call so that tests can switch it).
bool enabled();

// Whether forward<scalar_t> takes this call: float, bf16 or fp16, and levels small enough for int32 coordinates and
// offsets. float64 uses the baseline loops.
template <typename scalar_t>
bool forward_supported(const int64_t* shapes, const Sizes& n);

// Whether backward<scalar_t> takes this call: D = 16, 32, 64, 128 or 256 (also 8 for bf16/fp16), for which its
// channel loops are unrolled, and levels small enough for int32 coordinates and offsets. Other calls, and float64,
// use the baseline loops.
template <typename scalar_t>
bool backward_supported(const int64_t* shapes, const Sizes& n);

// value_tensor: `value` as a tensor (scratch memory is allocated like it).
template <typename scalar_t>
void forward(const Tensor& value_tensor, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
             const scalar_t* locations, const scalar_t* weights, scalar_t* output, const Sizes& n);

template <typename scalar_t>
void backward(const Tensor& value_tensor, const scalar_t* grad_output, const scalar_t* value, const int64_t* shapes,
              const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
              acc_type<scalar_t>* grad_value_acc, scalar_t* grad_locations, scalar_t* grad_weights, const Sizes& n);

}  // namespace avx2
}  // namespace msda
}  // namespace mpseg
