// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// The loops of the CPU kernels of mpseg::ms_deform_attn, written once and compiled once per instruction set:
// ms_deform_attn_kernel.cpp includes this file inside namespace `generic` (the build's baseline: SSE2 on x86-64, NEON on
// AArch64) and, on x86-64 with GCC, again inside namespace `avx2` under `#pragma GCC target("avx2,fma,f16c")`, and picks
// one of the two at run time. The includer sets MPSEG_LOOPS_AVX2 to 1 for the AVX2 copy, 0 otherwise (GCC does not
// define __AVX2__ inside a `#pragma GCC target` region in C++). No include guard on purpose; the includes this file
// needs come before the namespaces.
//
// Determinism: the backward uses no atomics and no thread-count-dependent reduction. Work is split into units
// (batch b, head m, level l); a unit owns grad_value[b, rows of level l, m, :] (disjoint from every other unit's rows)
// and the location/attention gradients of its samples, and visits its samples in a fixed order. So two runs give
// bit-identical gradients whatever the number of threads. Every unit handles Q * P samples, so the split is balanced.

// Channel loops. Values of one (b, m) row are D contiguous channels, so the loops run over channels with several
// independent vector accumulators: the loads of different (randomly placed) value rows then overlap instead of
// waiting on one dependent chain. GCC does not vectorise these reliably on its own (it kept 32 scalar accumulators in
// memory), hence explicit GCC/Clang vector types. Arithmetic is in opmath_t (float for bf16/fp16): reduced-precision
// rows are widened in registers as they are loaded (bf16: a 16-bit shift; fp16: F16C's vcvtph2ps where the instruction
// set has it). The backward dot products sum lane by lane, then the lanes in a fixed order: the same bits whatever the
// thread count.
#if defined(__GNUC__)
#define MPSEG_HAS_VECTOR_TYPES 1
#else
#define MPSEG_HAS_VECTOR_TYPES 0
#endif

#if MPSEG_LOOPS_AVX2
// 32 bytes: one ymm register; FMA is enabled too, and GCC contracts `acc += w * x` into vfmadd (-ffp-contract=fast,
// GCC's default for C++).
constexpr int64_t kVectorBytes = 32;
#else
// 16 bytes: a native register on every x86-64 (SSE2) and AArch64 (NEON) CPU; wider types get emulated (spilled).
constexpr int64_t kVectorBytes = 16;
#endif

#if MPSEG_HAS_VECTOR_TYPES
template <typename T>
struct Simd {
  typedef T type __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t lanes = kVectorBytes / sizeof(T);
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, const type& v) { std::memcpy(p, &v, sizeof(v)); }
  // x - 0 is x for every x (x + 0 is not for x = -0), so the subtraction folds away: a plain broadcast.
  static type broadcast(T x) { return x - type{}; }
};

// Simd<opmath_t>::lanes elements of a row of scalar_t, widened to opmath_t.
template <typename scalar_t, typename opmath_t>
inline typename Simd<opmath_t>::type load_widened(const scalar_t* p) {
  using S = Simd<opmath_t>;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return S::load(p);
  } else if constexpr (std::is_same_v<scalar_t, torch::headeronly::BFloat16>) {
    // bf16 is the upper half of a float: widen the 16-bit patterns to 32 bits and shift them up.
    typedef uint16_t Narrow __attribute__((vector_size(kVectorBytes / 2)));
    typedef uint32_t Wide __attribute__((vector_size(kVectorBytes)));
    Narrow bits;
    std::memcpy(&bits, p, sizeof(bits));
    const Wide wide = __builtin_convertvector(bits, Wide) << 16;
    typename S::type v;
    std::memcpy(&v, &wide, sizeof(v));
    return v;
#if MPSEG_LOOPS_AVX2
  } else if constexpr (std::is_same_v<scalar_t, torch::headeronly::Half>) {
    static_assert(S::lanes == 8);
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return reinterpret_cast<const typename S::type&>(v);
#endif
  } else {
    opmath_t widened[S::lanes];
    for (int64_t j = 0; j < S::lanes; ++j) widened[j] = static_cast<opmath_t>(p[j]);
    return S::load(widened);
  }
}

// Stores Simd<opmath_t>::lanes results, rounded to scalar_t (round to nearest even, as static_cast does elsewhere).
template <typename scalar_t, typename opmath_t>
inline void store_narrowed(scalar_t* p, const typename Simd<opmath_t>::type& v) {
  using S = Simd<opmath_t>;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    S::store(p, v);
  } else {
    opmath_t wide[S::lanes];
    S::store(wide, v);
    for (int64_t j = 0; j < S::lanes; ++j) p[j] = static_cast<scalar_t>(wide[j]);
  }
}
#endif

// out[d] = sum_i weights[i] * rows[i][d] for d < channels.
template <typename scalar_t, typename opmath_t>
inline void weighted_row_sum(const scalar_t* const* __restrict__ rows, const opmath_t* __restrict__ weights,
                             int64_t count, int64_t channels, scalar_t* __restrict__ out) {
  int64_t d = 0;
#if MPSEG_HAS_VECTOR_TYPES
  using S = Simd<opmath_t>;
  using V = typename S::type;
  // A block is 128 bytes of opmath_t (32 floats = one (b, m) row of the common D = 32, or 16 doubles): 8 vectors of
  // 16 bytes, or 4 of 32 bytes. Eight independent accumulators cover the latency of the multiply-adds, so with 4
  // vectors per block two rows go to separate accumulators, summed at the end (a fixed order: deterministic).
  constexpr int64_t kVecs = 128 / kVectorBytes;
  constexpr int64_t kChains = kVecs >= 8 ? 1 : 8 / kVecs;
  for (; d + kVecs * S::lanes <= channels; d += kVecs * S::lanes) {
    V acc[kChains][kVecs] = {};
    int64_t i = 0;
    for (; i + kChains <= count; i += kChains) {
#pragma GCC unroll 2
      for (int64_t c = 0; c < kChains; ++c) {
        const scalar_t* row = rows[i + c] + d;
        const V w = S::broadcast(weights[i + c]);
#pragma GCC unroll 8
        for (int64_t k = 0; k < kVecs; ++k) acc[c][k] += w * load_widened<scalar_t, opmath_t>(row + k * S::lanes);
      }
    }
    for (; i < count; ++i) {
      const scalar_t* row = rows[i] + d;
      const V w = S::broadcast(weights[i]);
#pragma GCC unroll 8
      for (int64_t k = 0; k < kVecs; ++k) acc[0][k] += w * load_widened<scalar_t, opmath_t>(row + k * S::lanes);
    }
#pragma GCC unroll 8
    for (int64_t k = 0; k < kVecs; ++k) {
#pragma GCC unroll 2
      for (int64_t c = 1; c < kChains; ++c) acc[0][k] += acc[c][k];
      store_narrowed<scalar_t, opmath_t>(out + d + k * S::lanes, acc[0][k]);
    }
  }
  for (; d + S::lanes <= channels; d += S::lanes) {
    V acc = {};
    for (int64_t i = 0; i < count; ++i) acc += S::broadcast(weights[i]) * load_widened<scalar_t, opmath_t>(rows[i] + d);
    store_narrowed<scalar_t, opmath_t>(out + d, acc);
  }
#endif
  for (; d < channels; ++d) {
    opmath_t acc = 0;
    for (int64_t i = 0; i < count; ++i) acc += weights[i] * static_cast<opmath_t>(rows[i][d]);
    out[d] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* locations,
                    const scalar_t* weights, scalar_t* output, const Sizes& n) {
  using opmath_t = acc_type<scalar_t>;
  const int64_t row_stride = n.heads * n.channels;  // value rows: [S, M, D]
  const int64_t samples = n.levels * n.points;
  // One task = one (b, q, m): D outputs from up to 4*L*P value rows.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, samples * n.channels));
  torch::stable::parallel_for(0, n.batch * n.queries * n.heads, grain, [&](int64_t begin, int64_t end) {
    // The task's corner rows and their weights (attention * bilinear), gathered first, then summed channel-block-wise.
    std::vector<const scalar_t*> rows(4 * samples);
    std::vector<opmath_t> row_weights(4 * samples);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m = task % n.heads;
      const int64_t b = task / (n.heads * n.queries);
      const scalar_t* loc = locations + task * samples * 2;  // [B, Q, M] flattened = task
      const scalar_t* w = weights + task * samples;
      int64_t count = 0;
      for (int64_t l = 0; l < n.levels; ++l) {
        const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
        const scalar_t* level_value = value + (b * n.rows + starts[l]) * row_stride + m * n.channels;
        for (int64_t p = 0; p < n.points; ++p) {
          const int64_t k = l * n.points + p;
          Bilinear<opmath_t> s;
          if (!bilinear_setup(static_cast<opmath_t>(loc[2 * k]), static_cast<opmath_t>(loc[2 * k + 1]), height,
                              width, s)) {
            continue;
          }
          const opmath_t attention = static_cast<opmath_t>(w[k]);
          for (int c = 0; c < 4; ++c) {
            if (!s.valid[c]) continue;
            rows[count] = level_value + s.index[c] * row_stride;
            row_weights[count] = attention * s.weight[c];
            ++count;
          }
        }
      }
      weighted_row_sum(rows.data(), row_weights.data(), count, n.channels, output + task * n.channels);
    }
  });
}

// Adds scale * grad to grad_row and returns <grad, value_row>, both over `channels`.
template <typename scalar_t, typename opmath_t>
inline opmath_t dot_and_scatter(const opmath_t* __restrict__ grad, const scalar_t* __restrict__ value_row,
                                opmath_t scale, opmath_t* __restrict__ grad_row, int64_t channels) {
  int64_t d = 0;
  opmath_t sum = 0;
#if MPSEG_HAS_VECTOR_TYPES
  using S = Simd<opmath_t>;
  using V = typename S::type;
  constexpr int64_t kVecs = 4;
  V lanes[kVecs] = {};
  const V scale_v = S::broadcast(scale);
  for (; d + kVecs * S::lanes <= channels; d += kVecs * S::lanes) {
#pragma GCC unroll 4
    for (int64_t k = 0; k < kVecs; ++k) {
      const int64_t at = d + k * S::lanes;
      const V g = S::load(grad + at);
      lanes[k] += g * load_widened<scalar_t, opmath_t>(value_row + at);
      S::store(grad_row + at, S::load(grad_row + at) + scale_v * g);
    }
  }
  for (; d + S::lanes <= channels; d += S::lanes) {
    const V g = S::load(grad + d);
    lanes[0] += g * load_widened<scalar_t, opmath_t>(value_row + d);
    S::store(grad_row + d, S::load(grad_row + d) + scale_v * g);
  }
  // Pairwise, in a fixed order: a few dependent adds instead of one chain through all kVecs * lanes partial sums (the
  // chain's latency, not the multiply-adds, bounded the backward).
  for (int64_t width = kVecs / 2; width >= 1; width /= 2) {
    for (int64_t k = 0; k < width; ++k) lanes[k] += lanes[k + width];
  }
  opmath_t partial[S::lanes];
  S::store(partial, lanes[0]);
  for (int64_t width = S::lanes / 2; width >= 1; width /= 2) {
    for (int64_t j = 0; j < width; ++j) partial[j] += partial[j + width];
  }
  sum = partial[0];
#endif
  for (; d < channels; ++d) {
    sum += grad[d] * static_cast<opmath_t>(value_row[d]);
    grad_row[d] += scale * grad[d];
  }
  return sum;
}

// grad_value is written through `grad_value_acc` (opmath_t: float for bf16/fp16, so sums of many small updates keep
// their precision). It must be zero on entry.
constexpr int64_t kPrefetchQueries = 16;

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                     const scalar_t* locations, const scalar_t* weights, acc_type<scalar_t>* grad_value_acc,
                     scalar_t* grad_locations, scalar_t* grad_weights, const Sizes& n) {
  using opmath_t = acc_type<scalar_t>;
  const int64_t row_stride = n.heads * n.channels;
  const int64_t samples = n.levels * n.points;
  torch::stable::parallel_for(0, n.batch * n.heads * n.levels, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> grad(n.channels);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t l = unit % n.levels;
      const int64_t m = (unit / n.levels) % n.heads;
      const int64_t b = unit / (n.levels * n.heads);
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const int64_t level_offset = (b * n.rows + starts[l]) * row_stride + m * n.channels;
      const scalar_t* level_value = value + level_offset;
      opmath_t* level_grad_value = grad_value_acc + level_offset;
      for (int64_t q = 0; q < n.queries; ++q) {
        const int64_t task = (b * n.queries + q) * n.heads + m;  // (b, q, m)
        const scalar_t* g = grad_output + task * n.channels;
#if defined(__GNUC__)
        // A unit reads grad_output and the locations with a stride of a whole query (M*D resp. M*L*P*2 elements),
        // which the hardware prefetchers follow poorly: fetch a few queries ahead.
        if (q + kPrefetchQueries < n.queries) {
          const scalar_t* g_ahead = g + kPrefetchQueries * n.heads * n.channels;
          for (int64_t d = 0; d < n.channels; d += 64 / sizeof(scalar_t)) __builtin_prefetch(g_ahead + d);
          const int64_t k_ahead = (task + kPrefetchQueries * n.heads) * samples + l * n.points;
          __builtin_prefetch(locations + 2 * k_ahead);
          __builtin_prefetch(weights + k_ahead);
        }
#endif
        const opmath_t* grad_row;
        if constexpr (std::is_same_v<scalar_t, opmath_t>) {
          grad_row = g;
        } else {
          for (int64_t d = 0; d < n.channels; ++d) grad[d] = static_cast<opmath_t>(g[d]);
          grad_row = grad.data();
        }
        for (int64_t p = 0; p < n.points; ++p) {
          const int64_t k = task * samples + l * n.points + p;  // (b, q, m, l, p)
          Bilinear<opmath_t> s;
          if (!bilinear_setup(static_cast<opmath_t>(locations[2 * k]), static_cast<opmath_t>(locations[2 * k + 1]),
                              height, width, s)) {
            continue;  // gradients stay zero
          }
          const opmath_t attention = static_cast<opmath_t>(weights[k]);
          opmath_t dot[4] = {0, 0, 0, 0};
          for (int c = 0; c < 4; ++c) {
            if (!s.valid[c]) continue;
            const int64_t offset = s.index[c] * row_stride;
            dot[c] = dot_and_scatter(grad_row, level_value + offset, attention * s.weight[c],
                                     level_grad_value + offset, n.channels);
          }
          opmath_t grad_attention, grad_x, grad_y;
          sample_gradients(s, dot, attention, height, width, &grad_attention, &grad_x, &grad_y);
          grad_weights[k] = static_cast<scalar_t>(grad_attention);
          grad_locations[2 * k] = static_cast<scalar_t>(grad_x);
          grad_locations[2 * k + 1] = static_cast<scalar_t>(grad_y);
        }
      }
    }
  });
}

#undef MPSEG_HAS_VECTOR_TYPES
