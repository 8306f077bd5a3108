// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// The AVX2 copy of the CPU kernels of mpseg::ms_deform_attn (declared in avx2.h; ms_deform_attn_kernel.cpp picks it at
// run time on CPUs with AVX2 and F16C, x86-64 since 2013-2015).
//
// Same bits as the baseline loops. Every output element is the same sequence of IEEE operations in both copies: the
// same per-sample setup (sampling.h), the same order of the multiply and add steps per channel, the same order of the
// adds in every dot product, and no fused multiply-add (the target below enables AVX2 and F16C but not FMA, so the
// compiler cannot contract `a + w * x`; on the CPUs measured, separate multiplies and adds issue on separate pipes and
// cost no throughput). Results therefore do not depend on which CPU ran them, and the tests compare the two copies
// bit for bit (tests/test_ms_deform_attn.py). What the AVX2 copy changes is how the work is laid out:
//
// Forward (float, bf16, fp16; float64 stays on the baseline loops). One task is one (b, q, m): D outputs from the 4*L*P
// corner rows of its samples. value is first copied head by head, [B, M, S + 1, D] (copy_by_head), with a row of zeros
// that out-of-map corners read with weight +0 (no branch; the sums are unchanged). Tasks run head by head, two
// neighbouring queries at a time: 8 independent accumulators (D = 32) hide the latency of the adds (each channel's sum
// is a dependent chain of 4*L*P adds). The bilinear setup runs on eight samples per register (setup8). Rows of
// bf16/fp16 are widened in registers (bf16: a 16-bit shift; fp16: vcvtph2ps) and the results narrowed with the
// rounding of a static_cast (round to nearest even).
//
// Backward. The units (b, m, l) of the baseline copy, visited in the same order, so the updates of grad_value land in
// the same order (deterministic whatever the thread count, no atomics), on head-major copies of value and grad_value.
// Samples are set up eight at a time, corners processed eight at a time (two samples). The baseline sums each
// corner's dot product <grad_output, value row> lane by lane and then adds the lanes one after the other; here the
// eight corners' lane sums are transposed into eight registers (corner = lane) so that the sequential adds of eight
// dot products run as vector adds, in the same order. Invalid corners read the zero row and write the grad_value
// copy's extra row (discarded), and their dot products are set to 0 as the baseline does.
//
// Measured speed and layout notes: docs/api/ops.rst ("CPU kernel layout") and docs/benchmarks.rst.
#include "ms_deform_attn/cpu/avx2.h"

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ms_deform_attn/sampling.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MPSEG_AVX2_BUILD 1
#include <immintrin.h>
#else
#define MPSEG_AVX2_BUILD 0
#endif

namespace mpseg {
namespace msda {
namespace avx2 {

using torch::headeronly::BFloat16;
using torch::headeronly::Half;

bool enabled() {
#if MPSEG_AVX2_BUILD
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  if (!supported) return false;
  const char* forced = std::getenv("MPSEG_CPU_KERNEL");
  return forced == nullptr || std::strcmp(forced, "generic") != 0;
#else
  return false;
#endif
}

// Whether the vectorised setup applies: int32 coordinates and element offsets (every level side below 2^24, so that
// the float comparisons of the setup decide exactly as the baseline's int64 ones, and (S + 1) * D below 2^31).
inline bool int32_setup_fits(const int64_t* shapes, const Sizes& n) {
  constexpr int64_t kSide = int64_t{1} << 24;
  if ((n.rows + 1) * n.channels >= (int64_t{1} << 31)) return false;
  for (int64_t l = 0; l < n.levels; ++l) {
    if (shapes[2 * l] >= kSide || shapes[2 * l + 1] >= kSide) return false;
  }
  return true;
}

template <typename scalar_t>
bool forward_supported(const int64_t* shapes, const Sizes& n) {
  return MPSEG_AVX2_BUILD && !std::is_same_v<scalar_t, double> && int32_setup_fits(shapes, n);
}

template <typename scalar_t>
bool backward_supported(const int64_t* shapes, const Sizes& n) {
  if (!int32_setup_fits(shapes, n)) return false;
  const int64_t channels = n.channels;
  // D = 16, 32, 64, 128, 256 (and 8 for bf16/fp16): the channel loops are unrolled for these.
  const bool listed = channels == 16 || channels == 32 || channels == 64 || channels == 128 || channels == 256;
  if constexpr (std::is_same_v<scalar_t, float>) return MPSEG_AVX2_BUILD && listed;
  if constexpr (std::is_same_v<scalar_t, Half> || std::is_same_v<scalar_t, BFloat16>) {
    return MPSEG_AVX2_BUILD && (listed || channels == 8);
  }
  return false;
}

#if MPSEG_AVX2_BUILD
#pragma GCC push_options
#pragma GCC target("avx2,f16c")

namespace {

// Registers of 8 floats (the opmath type of float, bf16 and fp16) loaded from and stored to rows of scalar_t.
struct FloatOps {
  using opmath = float;
  using reg = __m256;
  static constexpr int64_t lanes = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
};

template <typename scalar_t>
struct Wide;

template <>
struct Wide<float> : FloatOps {
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
};

template <>
struct Wide<BFloat16> : FloatOps {
  // bf16 is the upper half of a float: exact widening by a shift.
  static reg load(const BFloat16* p) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  // Round to nearest even, NaN -> 0x7FC0: the conversion of BFloat16(float).
  static void store(BFloat16* p, reg v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
};

template <>
struct Wide<Half> : FloatOps {
  static reg load(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(Half* p, reg v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};


// Transposes the 8x8 matrix of floats in r (r[i] is row i): afterwards r[j] holds column j.
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}


// Per-sample constants of one call, indexed by the sample k = l * P + p of a task and padded to whole registers: the
// level's width and height (as float and int32) and its first row.
struct SampleLevels {
  std::vector<float> width, height;
  std::vector<int32_t> width_int, height_int, start;
};

inline SampleLevels sample_levels(const int64_t* shapes, const int64_t* starts, const Sizes& n) {
  const int64_t samples = n.levels * n.points;
  const int64_t padded = (samples + 7) / 8 * 8;
  SampleLevels lv{std::vector<float>(padded, 1.0f), std::vector<float>(padded, 1.0f), std::vector<int32_t>(padded, 1),
                  std::vector<int32_t>(padded, 1), std::vector<int32_t>(padded, 0)};
  for (int64_t k = 0; k < samples; ++k) {
    const int64_t l = k / n.points;
    // A level the baseline would reject is never reached here: check_levels_host validated every level up front.
    lv.height[k] = static_cast<float>(shapes[2 * l]);
    lv.width[k] = static_cast<float>(shapes[2 * l + 1]);
    lv.height_int[k] = static_cast<int32_t>(shapes[2 * l]);
    lv.width_int[k] = static_cast<int32_t>(shapes[2 * l + 1]);
    lv.start[k] = static_cast<int32_t>(starts[l]);
  }
  return lv;
}

// Interleaves four registers a, b, c, d of eight lanes into (a0 b0 c0 d0 a1 b1 c1 d1 ...), stored at out[0..31].
inline void store_interleaved4(float* out, __m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab_lo = _mm256_unpacklo_ps(a, b), ab_hi = _mm256_unpackhi_ps(a, b);  // a0 b0 a1 b1 | a4 b4 a5 b5 ...
  const __m256 cd_lo = _mm256_unpacklo_ps(c, d), cd_hi = _mm256_unpackhi_ps(c, d);
  const __m256 e0 = _mm256_shuffle_ps(ab_lo, cd_lo, _MM_SHUFFLE(1, 0, 1, 0));  // lane 0 | lane 4
  const __m256 e1 = _mm256_shuffle_ps(ab_lo, cd_lo, _MM_SHUFFLE(3, 2, 3, 2));  // lane 1 | lane 5
  const __m256 e2 = _mm256_shuffle_ps(ab_hi, cd_hi, _MM_SHUFFLE(1, 0, 1, 0));  // lane 2 | lane 6
  const __m256 e3 = _mm256_shuffle_ps(ab_hi, cd_hi, _MM_SHUFFLE(3, 2, 3, 2));  // lane 3 | lane 7
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(e0, e1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(e2, e3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(e0, e1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(e2, e3, 0x31));
}

// The bilinear setup of eight samples, lane by lane the same float operations as bilinear_setup (sampling.h):
// x * W - 0.5, the in-map test, floor, x - floor, 1 - fraction, the products of the corner weights.
struct Corners8 {
  __m256i offset[4];  // element offset (row * channels) of corner c's row; of `zero_row` where the corner is invalid
  __m256i valid[4];   // all bits set where corner c is inside the map (and the sample is)
  __m256 weight[4];   // bilinear weight of corner c, +0 where invalid (Bilinear::weight)
  __m256 lx, ly, hx, hy;
  __m256 inside;      // all bits set where some corner is inside (bilinear_setup returned true)
};

// Per-lane level constants: width, height (float and int32) and the row added to every corner's row (the level's
// start in the forward, where the lanes' samples span levels; 0 in the backward).
struct Levels8 {
  __m256 width, height;
  __m256i width_int, height_int, start;
};

inline Corners8 setup8(__m256 x_loc, __m256 y_loc, const Levels8& lv, int32_t zero_row, int32_t channels) {
  Corners8 s;
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f);
  const __m256 x = _mm256_sub_ps(_mm256_mul_ps(x_loc, lv.width), half);
  const __m256 y = _mm256_sub_ps(_mm256_mul_ps(y_loc, lv.height), half);
  // Some corner inside (false for NaN): x in [-1, W) and y in [-1, H).
  s.inside = _mm256_and_ps(
      _mm256_and_ps(_mm256_cmp_ps(x, minus_one, _CMP_GE_OQ), _mm256_cmp_ps(x, lv.width, _CMP_LT_OQ)),
      _mm256_and_ps(_mm256_cmp_ps(y, minus_one, _CMP_GE_OQ), _mm256_cmp_ps(y, lv.height, _CMP_LT_OQ)));
  // Inside, floor is exact and equals the baseline's integer floor converted back to float.
  const __m256 x0f = _mm256_floor_ps(x), y0f = _mm256_floor_ps(y);
  s.lx = _mm256_sub_ps(x, x0f);
  s.ly = _mm256_sub_ps(y, y0f);
  s.hx = _mm256_sub_ps(one, s.lx);
  s.hy = _mm256_sub_ps(one, s.ly);
  // Integer corners; lanes outside hold anything (cvttps of NaN or huge values) and are masked.
  const __m256i x0 = _mm256_cvttps_epi32(x0f), y0 = _mm256_cvttps_epi32(y0f);
  const __m256i all = _mm256_castps_si256(s.inside);
  const __m256i minus_one_int = _mm256_set1_epi32(-1), one_int = _mm256_set1_epi32(1);
  // Inside, x0 >= -1 and x0 < W: x0 is in the map unless it is -1, x1 = x0 + 1 unless it is W.
  const __m256i x0_in = _mm256_cmpgt_epi32(x0, minus_one_int);
  const __m256i x1_in = _mm256_cmpgt_epi32(lv.width_int, _mm256_add_epi32(x0, one_int));
  const __m256i y0_in = _mm256_and_si256(all, _mm256_cmpgt_epi32(y0, minus_one_int));
  const __m256i y1_in = _mm256_and_si256(all, _mm256_cmpgt_epi32(lv.height_int, _mm256_add_epi32(y0, one_int)));
  s.valid[0] = _mm256_and_si256(y0_in, x0_in);
  s.valid[1] = _mm256_and_si256(y0_in, x1_in);
  s.valid[2] = _mm256_and_si256(y1_in, x0_in);
  s.valid[3] = _mm256_and_si256(y1_in, x1_in);
  const __m256i row00 = _mm256_add_epi32(lv.start, _mm256_add_epi32(_mm256_mullo_epi32(y0, lv.width_int), x0));
  const __m256i row[4] = {row00, _mm256_add_epi32(row00, one_int), _mm256_add_epi32(row00, lv.width_int),
                          _mm256_add_epi32(row00, _mm256_add_epi32(lv.width_int, one_int))};
  const __m256 weight[4] = {_mm256_mul_ps(s.hy, s.hx), _mm256_mul_ps(s.hy, s.lx), _mm256_mul_ps(s.ly, s.hx),
                            _mm256_mul_ps(s.ly, s.lx)};
  const __m256i zero_index = _mm256_set1_epi32(zero_row), channels_int = _mm256_set1_epi32(channels);
  for (int c = 0; c < 4; ++c) {
    s.offset[c] = _mm256_mullo_epi32(_mm256_blendv_epi8(zero_index, row[c], s.valid[c]), channels_int);
    s.weight[c] = _mm256_and_ps(weight[c], _mm256_castsi256_ps(s.valid[c]));
  }
  return s;
}

// (x0 y0 x1 y1 x2 y2 x3 y3), (x4 y4 ... x7 y7) -> x0..x7, y0..y7.
inline void deinterleave_xy(__m256 xy_lo, __m256 xy_hi, __m256* x, __m256* y) {
  const __m256 x_mixed = _mm256_shuffle_ps(xy_lo, xy_hi, _MM_SHUFFLE(2, 0, 2, 0));  // x0 x1 x4 x5 | x2 x3 x6 x7
  const __m256 y_mixed = _mm256_shuffle_ps(xy_lo, xy_hi, _MM_SHUFFLE(3, 1, 3, 1));
  *x = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(x_mixed), 0xD8));
  *y = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(y_mixed), 0xD8));
}

// The corners of one task's samples (forward), eight samples per register: rows[4 * k + c] is the element offset
// (row * channels, level start included) of corner c of sample k, or of `zero_row` (a row of zeros) where the
// baseline skips the corner (outside the map, or the whole sample outside); row_weights[4 * k + c] = attention *
// bilinear weight, +0 where skipped (the baseline's row weight, attention * Bilinear::weight).
template <typename scalar_t>
inline void setup_corners(const scalar_t* loc, const scalar_t* attention, const SampleLevels& lv, int64_t samples,
                          int32_t zero_row, int32_t channels, int32_t* rows, float* row_weights) {
  using W = Wide<scalar_t>;
  for (int64_t k = 0; k < samples; k += 8) {
    __m256 xy_lo, xy_hi, att;
    if (k + 8 <= samples) {
      xy_lo = W::load(loc + 2 * k);
      xy_hi = W::load(loc + 2 * k + 8);
      att = W::load(attention + k);
    } else {  // a partial register: copy what is there (beyond the task's samples may be beyond the tensor)
      scalar_t buffer[24];
      std::memset(static_cast<void*>(buffer), 0, sizeof(buffer));
      std::memcpy(static_cast<void*>(buffer), loc + 2 * k, 2 * (samples - k) * sizeof(scalar_t));
      std::memcpy(static_cast<void*>(buffer + 16), attention + k, (samples - k) * sizeof(scalar_t));
      xy_lo = W::load(buffer);
      xy_hi = W::load(buffer + 8);
      att = W::load(buffer + 16);
    }
    __m256 x, y;
    deinterleave_xy(xy_lo, xy_hi, &x, &y);
    const Levels8 levels{_mm256_loadu_ps(lv.width.data() + k), _mm256_loadu_ps(lv.height.data() + k),
                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lv.width_int.data() + k)),
                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lv.height_int.data() + k)),
                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lv.start.data() + k))};
    const Corners8 s = setup8(x, y, levels, zero_row, channels);
    __m256 weights[4];
    for (int c = 0; c < 4; ++c) {
      weights[c] = _mm256_and_ps(_mm256_mul_ps(att, s.weight[c]), _mm256_castsi256_ps(s.valid[c]));
    }
    store_interleaved4(reinterpret_cast<float*>(rows + 4 * k), _mm256_castsi256_ps(s.offset[0]),
                       _mm256_castsi256_ps(s.offset[1]), _mm256_castsi256_ps(s.offset[2]),
                       _mm256_castsi256_ps(s.offset[3]));
    store_interleaved4(row_weights + 4 * k, weights[0], weights[1], weights[2], weights[3]);
  }
}

// out_t[d] = sum_i row_weights_t[i] * base[offsets_t[i] + d] over the count corners of tasks t < tasks (1 or 2) of one
// (b, m). Skipped corners read the zero row with weight +0, which leaves every sum as it is (a sum that starts from +0
// is never -0, and x + 0 = x otherwise). Each channel is summed in the order of i from +0, a multiply and an add per
// step: the baseline's arithmetic.
template <typename scalar_t>
inline void sum_corner_rows(int tasks, const scalar_t* base, const int32_t* const offsets[2],
                            const float* const row_weights[2], int64_t count, int64_t channels,
                            scalar_t* const out[2]) {
  using W = Wide<scalar_t>;
  using reg = typename W::reg;
  constexpr int64_t kVecs = 4;
  int64_t d = 0;
  for (; d + kVecs * W::lanes <= channels; d += kVecs * W::lanes) {
    reg acc[2][kVecs];
    for (int t = 0; t < 2; ++t) {
      for (int64_t k = 0; k < kVecs; ++k) acc[t][k] = W::zero();
    }
    const scalar_t* block = base + d;
    if (tasks == 2) {
      for (int64_t i = 0; i < count; ++i) {
        const scalar_t* r0 = block + offsets[0][i];
        const scalar_t* r1 = block + offsets[1][i];
        const reg w0 = W::set1(row_weights[0][i]);
        const reg w1 = W::set1(row_weights[1][i]);
#pragma GCC unroll 4
        for (int64_t k = 0; k < kVecs; ++k) {
          acc[0][k] = W::add(acc[0][k], W::mul(w0, W::load(r0 + k * W::lanes)));
          acc[1][k] = W::add(acc[1][k], W::mul(w1, W::load(r1 + k * W::lanes)));
        }
      }
    } else {
      for (int64_t i = 0; i < count; ++i) {
        const scalar_t* r0 = block + offsets[0][i];
        const reg w0 = W::set1(row_weights[0][i]);
#pragma GCC unroll 4
        for (int64_t k = 0; k < kVecs; ++k) acc[0][k] = W::add(acc[0][k], W::mul(w0, W::load(r0 + k * W::lanes)));
      }
    }
    for (int t = 0; t < tasks; ++t) {
#pragma GCC unroll 4
      for (int64_t k = 0; k < kVecs; ++k) W::store(out[t] + d + k * W::lanes, acc[t][k]);
    }
  }
  for (int t = 0; t < tasks; ++t) {
    int64_t e = d;
    for (; e + W::lanes <= channels; e += W::lanes) {
      reg acc = W::zero();
      for (int64_t i = 0; i < count; ++i) {
        acc = W::add(acc, W::mul(W::set1(row_weights[t][i]), W::load(base + offsets[t][i] + e)));
      }
      W::store(out[t] + e, acc);
    }
    for (; e < channels; ++e) {
      float acc = 0;
      for (int64_t i = 0; i < count; ++i) acc += row_weights[t][i] * static_cast<float>(base[offsets[t][i] + e]);
      out[t][e] = static_cast<scalar_t>(acc);
    }
  }
}

// Copies value [B, S, M, D] into by_head [B, M, S + 1, D]: each head's rows contiguous (rows of a [B, S, M, D]
// tensor are M * D apart, so one head's rows fall into a fraction of the cache sets), and a row of zeros after each
// head's rows, which the corners outside the map read.
template <typename scalar_t>
void copy_by_head(const scalar_t* value, scalar_t* by_head, const Sizes& n) {
  const int64_t slab = (n.rows + 1) * n.channels;
  torch::stable::parallel_for(0, n.batch * (n.rows + 1), 256, [&](int64_t begin, int64_t end) {
    for (int64_t bs = begin; bs < end; ++bs) {
      const int64_t b = bs / (n.rows + 1), row = bs % (n.rows + 1);
      for (int64_t m = 0; m < n.heads; ++m) {
        scalar_t* to = by_head + (b * n.heads + m) * slab + row * n.channels;
        if (row < n.rows) {
          std::memcpy(static_cast<void*>(to), value + ((b * n.rows + row) * n.heads + m) * n.channels,
                      n.channels * sizeof(scalar_t));
        } else {
          std::memset(static_cast<void*>(to), 0, n.channels * sizeof(scalar_t));  // +0 in every dtype
        }
      }
    }
  });
}

constexpr int64_t kPrefetchQueries = 16;  // as the baseline backward

}  // namespace

// The tasks (b, q, m) run head by head, queries in order (consecutive tasks are neighbouring queries of one head, whose
// corner rows overlap and stay in cache), two queries at a time.
template <typename scalar_t>
void forward(const Tensor& value_tensor, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
             const scalar_t* locations, const scalar_t* weights, scalar_t* output, const Sizes& n) {
  if constexpr (std::is_same_v<acc_type<scalar_t>, float>) {
    const int64_t samples = n.levels * n.points;
    const int64_t corners = 4 * samples;
    const int64_t pairs_per_head = (n.queries + 1) / 2;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, samples * n.channels));
    const SampleLevels lv = sample_levels(shapes, starts, n);
    const int64_t padded = (samples + 7) / 8 * 4 * 8;
    // The value rows head by head (copy_by_head), one head's rows then share the caches.
    const int64_t slab = (n.rows + 1) * n.channels;
    const Tensor by_head_tensor = empty(value_tensor, {n.batch * n.heads * slab}, value_tensor.scalar_type());
    scalar_t* by_head = by_head_tensor.mutable_data_ptr<scalar_t>();
    copy_by_head(value, by_head, n);
    torch::stable::parallel_for(0, n.batch * n.heads * pairs_per_head, grain, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> offset_buffer(2 * padded);
      std::vector<float> weight_buffer(2 * padded);
      const int32_t* const offsets[2] = {offset_buffer.data(), offset_buffer.data() + padded};
      const float* const row_weights[2] = {weight_buffer.data(), weight_buffer.data() + padded};
      int64_t bm = begin / pairs_per_head, q = 2 * (begin % pairs_per_head);  // then counted, not divided
      int64_t b = bm / n.heads, m = bm % n.heads;
      for (int64_t pair = begin; pair < end; ++pair) {
        if (q >= n.queries) {
          q = 0;
          ++bm;
          if (++m == n.heads) {
            m = 0;
            ++b;
          }
        }
        const int count_tasks = q + 1 < n.queries ? 2 : 1;
        scalar_t* out[2] = {nullptr, nullptr};
        const int64_t first_task = (b * n.queries + q) * n.heads + m;  // (b, q, m)
        if (q + 2 + kPrefetchQueries < n.queries) {
          // Tasks of one head are M * L * P samples apart in sampling_locations and attention_weights: a stride the
          // hardware prefetchers follow poorly. Fetch the pair kPrefetchQueries queries ahead.
          const int64_t ahead = first_task + kPrefetchQueries * n.heads;
          for (int64_t at = 0; at < 2 * samples; at += 64 / sizeof(scalar_t)) {
            __builtin_prefetch(locations + ahead * samples * 2 + at);
            __builtin_prefetch(locations + (ahead + n.heads) * samples * 2 + at);
          }
          for (int64_t at = 0; at < samples; at += 64 / sizeof(scalar_t)) {
            __builtin_prefetch(weights + ahead * samples + at);
            __builtin_prefetch(weights + (ahead + n.heads) * samples + at);
          }
        }
        for (int t = 0; t < count_tasks; ++t) {
          const int64_t task = first_task + t * n.heads;
          setup_corners(locations + task * samples * 2, weights + task * samples, lv, samples,
                        static_cast<int32_t>(n.rows), static_cast<int32_t>(n.channels),
                        offset_buffer.data() + t * padded, weight_buffer.data() + t * padded);
          out[t] = output + task * n.channels;
        }
        sum_corner_rows<scalar_t>(count_tasks, by_head + bm * slab, offsets, row_weights, corners, n.channels, out);
        q += 2;
      }
    });
  }
}

// Undoes the interleaving of the dot products of eight samples' corners: dots[g] holds the corners of samples 2g and
// 2g + 1 (c0 c1 c2 c3 | c0 c1 c2 c3); out[c] gets corner c of samples 0..7.
inline void deinterleave4(const __m256 dots[4], __m256 out[4]) {
  // A 4x4 transpose inside each 128-bit half: half 0 gives (s0 s2 s4 s6), half 1 (s1 s3 s5 s7) of each corner.
  const __m256 t0 = _mm256_unpacklo_ps(dots[0], dots[1]), t1 = _mm256_unpackhi_ps(dots[0], dots[1]);
  const __m256 t2 = _mm256_unpacklo_ps(dots[2], dots[3]), t3 = _mm256_unpackhi_ps(dots[2], dots[3]);
  const __m256 c[4] = {_mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
                       _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2))};
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int k = 0; k < 4; ++k) out[k] = _mm256_permutevar8x32_ps(c[k], order);
}

// The backward of one unit (b, m, l) with D = 8 * kVectors channels, samples taken eight at a time in the baseline's
// order (query, point). grad_value goes to the head-major scratch (see backward()).
template <typename scalar_t, int kVectors>
void backward_unit(int64_t unit, const scalar_t* grad_output, const scalar_t* by_head, float* grad_by_head,
                   const int64_t* shapes, const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
                   scalar_t* grad_locations, scalar_t* grad_weights, const Sizes& n) {
  using W = Wide<scalar_t>;
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  constexpr int64_t kChannels = 8 * kVectors;
  // Per corner, the registers whose lanes the baseline adds one after the other: for float two (channels 16i..16i+7
  // and 16i+8..16i+15 accumulated over the 16-channel blocks i: the baseline's four 4-float lanes), for bf16/fp16 the
  // products of every 8 channels (the baseline sums reduced-precision dot products channel by channel).
  constexpr int kPartials = kFloat ? 2 : kVectors;
  const int64_t samples = n.levels * n.points;
  const int64_t slab = (n.rows + 1) * kChannels;
  const int64_t l = unit % n.levels;
  const int64_t m = (unit / n.levels) % n.heads;
  const int64_t b = unit / (n.levels * n.heads);
  const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
  const int64_t level_offset = (b * n.heads + m) * slab + starts[l] * kChannels;
  const scalar_t* level_value = by_head + level_offset;
  float* level_grad = grad_by_head + level_offset;
  const Levels8 levels{_mm256_set1_ps(static_cast<float>(width)), _mm256_set1_ps(static_cast<float>(height)),
                       _mm256_set1_epi32(static_cast<int32_t>(width)), _mm256_set1_epi32(static_cast<int32_t>(height)),
                       _mm256_setzero_si256()};
  const int32_t zero_row = static_cast<int32_t>(n.rows - starts[l]);  // the slab's last row, from the level's start
  const int64_t count = n.queries * n.points;
  int64_t next_q = 0, next_p = 0;  // the sample after the last one gathered (no divisions in the loop)
  for (int64_t i0 = 0; i0 < count; i0 += 8) {
    const int lanes = static_cast<int>(std::min<int64_t>(8, count - i0));
    // Gather eight samples (query, point) of this level; absent lanes get NaN locations (no corner inside).
    alignas(32) float xy[16], att[8];
    int64_t k[8], task[8];
    for (int j = 0; j < 8; ++j) {
      if (j < lanes) {
        task[j] = (b * n.queries + next_q) * n.heads + m;                    // (b, q, m)
        k[j] = task[j] * samples + l * n.points + next_p;                   // (b, q, m, l, p)
        if (++next_p == n.points) {
          next_p = 0;
          ++next_q;
        }
        xy[2 * j] = static_cast<float>(locations[2 * k[j]]);
        xy[2 * j + 1] = static_cast<float>(locations[2 * k[j] + 1]);
        att[j] = static_cast<float>(weights[k[j]]);
      } else {
        xy[2 * j] = xy[2 * j + 1] = __builtin_nanf("");
        att[j] = 0;
      }
    }
    {
      // A few queries ahead: one query's M * L * P samples apart, a stride the prefetchers follow poorly.
      const int64_t q_ahead = next_q + kPrefetchQueries;
      if (q_ahead < n.queries) {
        const int64_t k_ahead = ((b * n.queries + q_ahead) * n.heads + m) * samples + l * n.points;
        __builtin_prefetch(locations + 2 * k_ahead);
        __builtin_prefetch(weights + k_ahead);
        const scalar_t* g_ahead = grad_output + ((b * n.queries + q_ahead) * n.heads + m) * kChannels;
        for (int64_t d = 0; d < kChannels; d += 64 / sizeof(scalar_t)) __builtin_prefetch(g_ahead + d);
      }
    }
    __m256 x, y;
    deinterleave_xy(_mm256_load_ps(xy), _mm256_load_ps(xy + 8), &x, &y);
    const __m256 attention = _mm256_load_ps(att);
    const Corners8 s = setup8(x, y, levels, zero_row, static_cast<int32_t>(kChannels));
    // Per corner (sample-major, as the baseline visits them): offset and scale attention * weight (the update of
    // grad_value is scale * grad_output; +0 for invalid corners, whose updates go to the scratch row).
    alignas(32) int32_t offsets[32];
    alignas(32) float scales[32];
    store_interleaved4(reinterpret_cast<float*>(offsets), _mm256_castsi256_ps(s.offset[0]),
                       _mm256_castsi256_ps(s.offset[1]), _mm256_castsi256_ps(s.offset[2]),
                       _mm256_castsi256_ps(s.offset[3]));
    store_interleaved4(scales, _mm256_mul_ps(attention, s.weight[0]), _mm256_mul_ps(attention, s.weight[1]),
                       _mm256_mul_ps(attention, s.weight[2]), _mm256_mul_ps(attention, s.weight[3]));
    // partial[group][i][corner]: the partial-sum registers of the eight corners of samples 2 * group, 2 * group + 1.
    __m256 partial[4][kPartials][8];
    for (int group = 0; group < 4; ++group) {
      if (2 * group >= lanes) {
        for (int i = 0; i < kPartials; ++i) {
          for (int corner = 0; corner < 8; ++corner) partial[group][i][corner] = _mm256_setzero_ps();
        }
        continue;
      }
      for (int half = 0; half < 2; ++half) {
        const int j = 2 * group + half;
        __m256 grad[kVectors];
        if (j < lanes) {
          const scalar_t* g = grad_output + task[j] * kChannels;
#pragma GCC unroll 32
          for (int v = 0; v < kVectors; ++v) grad[v] = W::load(g + 8 * v);
        } else {
#pragma GCC unroll 32
          for (int v = 0; v < kVectors; ++v) grad[v] = _mm256_setzero_ps();
        }
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          const int corner = 4 * j + c;
          const scalar_t* value_row = level_value + offsets[corner];
          float* grad_row = level_grad + offsets[corner];
          const __m256 scale = _mm256_set1_ps(scales[corner]);
          if constexpr (kFloat) {
            __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
#pragma GCC unroll 16
            for (int v = 0; v < kVectors; v += 2) {
              lo = _mm256_add_ps(lo, _mm256_mul_ps(grad[v], _mm256_loadu_ps(value_row + 8 * v)));
              hi = _mm256_add_ps(hi, _mm256_mul_ps(grad[v + 1], _mm256_loadu_ps(value_row + 8 * v + 8)));
              _mm256_storeu_ps(grad_row + 8 * v,
                               _mm256_add_ps(_mm256_loadu_ps(grad_row + 8 * v), _mm256_mul_ps(scale, grad[v])));
              _mm256_storeu_ps(grad_row + 8 * v + 8,
                               _mm256_add_ps(_mm256_loadu_ps(grad_row + 8 * v + 8), _mm256_mul_ps(scale, grad[v + 1])));
            }
            partial[group][0][4 * half + c] = lo;
            partial[group][1][4 * half + c] = hi;
          } else {
#pragma GCC unroll 32
            for (int v = 0; v < kVectors; ++v) {
              partial[group][v][4 * half + c] = _mm256_mul_ps(grad[v], W::load(value_row + 8 * v));
              _mm256_storeu_ps(grad_row + 8 * v,
                               _mm256_add_ps(_mm256_loadu_ps(grad_row + 8 * v), _mm256_mul_ps(scale, grad[v])));
            }
          }
        }
      }
    }
    // dots[group][corner] = 0 + lane 0 + lane 1 + ... over the partials in order, eight corners per register; the
    // four groups' chains of adds interleaved (independent, so their latencies overlap).
    __m256 dots[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int i = 0; i < kPartials; ++i) {
      for (int group = 0; group < 4; ++group) transpose8(partial[group][i]);
#pragma GCC unroll 8
      for (int lane = 0; lane < 8; ++lane) {
#pragma GCC unroll 4
        for (int group = 0; group < 4; ++group) dots[group] = _mm256_add_ps(dots[group], partial[group][i][lane]);
      }
    }
    __m256 dot[4];
    deinterleave4(dots, dot);
    for (int c = 0; c < 4; ++c) dot[c] = _mm256_and_ps(dot[c], _mm256_castsi256_ps(s.valid[c]));  // invalid: 0
    // sample_gradients (sampling.h), eight samples at once, in its order of operations.
    const __m256 grad_attention = _mm256_add_ps(
        _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(s.weight[0], dot[0]), _mm256_mul_ps(s.weight[1], dot[1])),
                      _mm256_mul_ps(s.weight[2], dot[2])),
        _mm256_mul_ps(s.weight[3], dot[3]));
    const __m256 dx = _mm256_add_ps(_mm256_mul_ps(s.hy, _mm256_sub_ps(dot[1], dot[0])),
                                    _mm256_mul_ps(s.ly, _mm256_sub_ps(dot[3], dot[2])));
    const __m256 dy = _mm256_add_ps(_mm256_mul_ps(s.hx, _mm256_sub_ps(dot[2], dot[0])),
                                    _mm256_mul_ps(s.lx, _mm256_sub_ps(dot[3], dot[1])));
    const __m256 grad_x = _mm256_mul_ps(_mm256_mul_ps(attention, levels.width), dx);
    const __m256 grad_y = _mm256_mul_ps(_mm256_mul_ps(attention, levels.height), dy);
    alignas(32) float out_attention[8], out_x[8], out_y[8];
    _mm256_store_ps(out_attention, grad_attention);
    _mm256_store_ps(out_x, grad_x);
    _mm256_store_ps(out_y, grad_y);
    const int inside = _mm256_movemask_ps(s.inside);
    for (int j = 0; j < lanes; ++j) {
      if (!(inside >> j & 1)) continue;  // gradients stay zero
      grad_weights[k[j]] = static_cast<scalar_t>(out_attention[j]);
      grad_locations[2 * k[j]] = static_cast<scalar_t>(out_x[j]);
      grad_locations[2 * k[j] + 1] = static_cast<scalar_t>(out_y[j]);
    }
  }
}

template <typename scalar_t, int kVectors>
void backward_units(const Tensor& value_tensor, const scalar_t* grad_output, const scalar_t* value,
                    const int64_t* shapes, const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
                    float* grad_value_acc, scalar_t* grad_locations, scalar_t* grad_weights, const Sizes& n) {
  // value and grad_value head by head, [B, M, S + 1, D] (copy_by_head): the last row of each head reads zeros
  // (value) and takes the updates of invalid corners (grad_value: a scratch row, discarded).
  const int64_t channels = n.channels;
  const int64_t slab = (n.rows + 1) * channels;
  const Tensor by_head_tensor = empty(value_tensor, {n.batch * n.heads * slab}, value_tensor.scalar_type());
  scalar_t* by_head = by_head_tensor.mutable_data_ptr<scalar_t>();
  copy_by_head(value, by_head, n);
  const Tensor grad_by_head_tensor = zeros(value_tensor, {n.batch * n.heads * slab}, ScalarType::Float);
  float* grad_by_head = grad_by_head_tensor.mutable_data_ptr<float>();
  torch::stable::parallel_for(0, n.batch * n.heads * n.levels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      backward_unit<scalar_t, kVectors>(unit, grad_output, by_head, grad_by_head, shapes, starts, locations, weights,
                                        grad_locations, grad_weights, n);
    }
  });
  // grad_value_acc (zero on entry) takes the sums: the values the baseline accumulates in place, in the same order.
  torch::stable::parallel_for(0, n.batch * n.rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t bs = begin; bs < end; ++bs) {
      const int64_t b = bs / n.rows, row = bs % n.rows;
      for (int64_t m = 0; m < n.heads; ++m) {
        std::memcpy(grad_value_acc + (bs * n.heads + m) * channels,
                    grad_by_head + (b * n.heads + m) * slab + row * channels, channels * sizeof(float));
      }
    }
  });
}

template <typename scalar_t>
void backward(const Tensor& value_tensor, const scalar_t* grad_output, const scalar_t* value, const int64_t* shapes,
              const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
              acc_type<scalar_t>* grad_value_acc, scalar_t* grad_locations, scalar_t* grad_weights, const Sizes& n) {
  if constexpr (std::is_same_v<acc_type<scalar_t>, float>) {
#define MPSEG_BACKWARD_CASE(vectors)                                                                             \
  case vectors:                                                                                                  \
    backward_units<scalar_t, vectors>(value_tensor, grad_output, value, shapes, starts, locations, weights,     \
                                      grad_value_acc, grad_locations, grad_weights, n);                          \
    return;
    switch (n.channels / 8) {
      MPSEG_BACKWARD_CASE(2)
      MPSEG_BACKWARD_CASE(4)
      MPSEG_BACKWARD_CASE(8)
      MPSEG_BACKWARD_CASE(16)
      MPSEG_BACKWARD_CASE(32)
      default:
        break;
    }
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (n.channels == 8) {
        backward_units<scalar_t, 1>(value_tensor, grad_output, value, shapes, starts, locations, weights,
                                    grad_value_acc, grad_locations, grad_weights, n);
      }
    }
#undef MPSEG_BACKWARD_CASE
  }
}

#pragma GCC pop_options

#else  // no AVX2 copy in this build: enabled() is false and these are never called

template <typename scalar_t>
void forward(const Tensor&, const scalar_t*, const int64_t*, const int64_t*, const scalar_t*, const scalar_t*,
             scalar_t*, const Sizes&) {}

template <typename scalar_t>
void backward(const Tensor&, const scalar_t*, const scalar_t*, const int64_t*, const int64_t*, const scalar_t*,
              const scalar_t*, acc_type<scalar_t>*, scalar_t*, scalar_t*, const Sizes&) {}

#endif

#define MPSEG_INSTANTIATE(T)                                                                                         \
  template bool forward_supported<T>(const int64_t*, const Sizes&);                                                  \
  template bool backward_supported<T>(const int64_t*, const Sizes&);                                                 \
  template void forward<T>(const Tensor&, const T*, const int64_t*, const int64_t*, const T*, const T*, T*,         \
                           const Sizes&);                                                                            \
  template void backward<T>(const Tensor&, const T*, const T*, const int64_t*, const int64_t*, const T*, const T*,    \
                            acc_type<T>*, T*, T*, const Sizes&);
MPSEG_INSTANTIATE(float)
MPSEG_INSTANTIATE(double)  // forward_supported / backward_supported are false for it
MPSEG_INSTANTIATE(Half)
MPSEG_INSTANTIATE(BFloat16)
#undef MPSEG_INSTANTIATE

}  // namespace avx2
}  // namespace msda
}  // namespace mpseg
