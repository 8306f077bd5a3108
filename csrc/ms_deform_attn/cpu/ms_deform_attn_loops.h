// Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
//
// The loops of the CPU kernels of mpseg::ms_deform_attn, written once for a vector width `kVectorBytes`. This file is
// included twice by ms_deform_attn_kernel.cpp, each time inside its own namespace of an anonymous namespace:
//   - baseline: 16-byte vectors (SSE2 on x86-64, NEON on AArch64), the compiler's default target;
//   - avx2: 32-byte vectors under `#pragma GCC target("avx2,fma,f16c")`, chosen at run time on CPUs that have them.
// Everything here therefore has internal linkage: no inline function compiled for AVX2 can be picked by the linker
// for a caller on an older CPU (the one-definition-rule hazard of compiling a translation unit with -mavx2). Helpers
// defined outside (sampling.h, ATen, the standard library) keep the default target. No include guard, and no #include:
// the includer provides the headers.
//
// The includer defines kVectorBytes (16 or 32), MPSEG_MSDA_F16C (1 where the F16C conversions may be used) and the
// plain structs Problem (inputs) and Gradients (outputs of the backward).
//
// Layout: value [B, S, M, D], locations [B, Q, M, L, P, 2], weights [B, Q, M, L, P], output [B, Q, M * D]. One value
// row (b, s, m) holds D contiguous channels: every sample reads (or, in the backward, updates) four such rows, so the
// loops run over channels in vectors, with the bilinear setup done once per sample for all channels.

// Lane-parallel arithmetic on GCC/Clang vector types; a one-lane "vector" (the scalar itself) elsewhere.
template <typename T>
struct Vec {
#if defined(__GNUC__)
  typedef T type __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t lanes = kVectorBytes / sizeof(T);
#else
  typedef T type;
  static constexpr int64_t lanes = 1;
#endif
  static inline type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static inline void store(T* p, const type& v) { std::memcpy(p, &v, sizeof(v)); }
  static inline type broadcast(T x) { return type{} + x; }
  static inline T lane(const type& v, int64_t j) {
    T out[lanes];
    std::memcpy(out, &v, sizeof(v));
    return out[j];
  }
};

#if defined(__GNUC__)
// The bits of a float vector and of as many bfloat16 values.
typedef uint32_t FloatBits __attribute__((vector_size(kVectorBytes)));
typedef uint16_t BFloat16Bits __attribute__((vector_size(kVectorBytes / 2)));
#endif

// Loads and stores `lanes` elements of scalar_t as one vector of its accumulation type (float for bf16/fp16).
template <typename scalar_t>
struct Io {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vec<opmath_t>;
  using vec = typename V::type;
  static constexpr int64_t lanes = V::lanes;

  static inline vec load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      return V::load(p);
#if defined(__GNUC__)
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // bfloat16 is the upper half of a float: widen and shift (exact).
      BFloat16Bits half;
      std::memcpy(&half, p, sizeof(half));
      const FloatBits bits = __builtin_convertvector(half, FloatBits) << 16;
      vec v;
      std::memcpy(&v, &bits, sizeof(v));
      return v;
#endif
#if MPSEG_MSDA_F16C
    } else if constexpr (std::is_same_v<scalar_t, c10::Half> && lanes == 8) {
      return reinterpret_cast<vec>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#endif
    } else {
      opmath_t wide[lanes];
      for (int64_t j = 0; j < lanes; ++j) wide[j] = static_cast<opmath_t>(p[j]);
      return V::load(wide);
    }
  }

  static inline void store(scalar_t* p, const vec& v) {
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      V::store(p, v);
#if defined(__GNUC__)
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // c10::BFloat16's rounding, lane-parallel: round to nearest even; NaN becomes the canonical 0x7FC0.
      FloatBits bits;
      std::memcpy(&bits, &v, sizeof(bits));
      const FloatBits rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
      const FloatBits out = (v != v) ? (FloatBits{} + 0x7FC0u) : rounded;
      const BFloat16Bits narrow = __builtin_convertvector(out, BFloat16Bits);
      std::memcpy(p, &narrow, sizeof(narrow));
#endif
#if MPSEG_MSDA_F16C
    } else if constexpr (std::is_same_v<scalar_t, c10::Half> && lanes == 8) {
      // IEEE round to nearest even, as c10::Half's conversion (NaN payloads aside).
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                       _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    } else {
      for (int64_t j = 0; j < lanes; ++j) p[j] = static_cast<scalar_t>(V::lane(v, j));
    }
  }
};

// Calls f(std::integral_constant<int, NV>{}, d) over [0, channels) in blocks of NV <= 4 whole vectors (NV is a
// compile-time constant, so a block's accumulators live in registers: 32 floats = 4 AVX2 vectors, the common D = 32)
// and returns where the whole vectors end; the caller handles the remaining channels one by one.
template <int64_t lanes, typename F>
inline int64_t for_vector_blocks(int64_t channels, F&& f) {
  int64_t d = 0;
  for (; d + 4 * lanes <= channels; d += 4 * lanes) f(std::integral_constant<int, 4>{}, d);
  switch ((channels - d) / lanes) {
    case 3:
      f(std::integral_constant<int, 3>{}, d);
      return d + 3 * lanes;
    case 2:
      f(std::integral_constant<int, 2>{}, d);
      return d + 2 * lanes;
    case 1:
      f(std::integral_constant<int, 1>{}, d);
      return d + lanes;
    default:
      return d;
  }
}

// The sums of the lanes of v[0..3] in a fixed order (the same bits whatever the thread count): pairwise, as a
// transposing tree of shuffles and adds where the compiler has __builtin_shufflevector.
template <typename T>
inline void lane_sums4(const typename Vec<T>::type v[4], T out[4]) {
  using vec = typename Vec<T>::type;
  constexpr int64_t lanes = Vec<T>::lanes;
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
  if constexpr (lanes == 8 || lanes == 4 || lanes == 2) {
    // pair(a, b) = (a0 + a1, a2 + a3, ..., b0 + b1, ...): after log2(lanes) rounds lane c holds the sum of v[c].
    const auto pair = [](const vec& a, const vec& b) -> vec {
      if constexpr (lanes == 8) {
        return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14) +
               __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
      } else if constexpr (lanes == 4) {
        return __builtin_shufflevector(a, b, 0, 2, 4, 6) + __builtin_shufflevector(a, b, 1, 3, 5, 7);
      } else {
        return __builtin_shufflevector(a, b, 0, 2) + __builtin_shufflevector(a, b, 1, 3);
      }
    };
    T sums[lanes];
    if constexpr (lanes == 8) {
      const vec halves = pair(pair(v[0], v[1]), pair(v[2], v[3]));  // lanes 2c, 2c + 1: the halves of v[c]
      const vec total = pair(halves, halves);
      std::memcpy(sums, &total, sizeof(total));
      for (int c = 0; c < 4; ++c) out[c] = sums[c];
    } else if constexpr (lanes == 4) {
      const vec total = pair(pair(v[0], v[1]), pair(v[2], v[3]));
      std::memcpy(sums, &total, sizeof(total));
      for (int c = 0; c < 4; ++c) out[c] = sums[c];
    } else {
      const vec first = pair(v[0], v[1]), second = pair(v[2], v[3]);
      std::memcpy(sums, &first, sizeof(first));
      out[0] = sums[0], out[1] = sums[1];
      std::memcpy(sums, &second, sizeof(second));
      out[2] = sums[0], out[3] = sums[1];
    }
    return;
  }
#endif
#endif
  for (int c = 0; c < 4; ++c) {
    T partial[lanes];
    for (int64_t j = 0; j < lanes; ++j) partial[j] = Vec<T>::lane(v[c], j);
    for (int64_t width = lanes; width > 1; width /= 2) {
      for (int64_t j = 0; j < width / 2; ++j) partial[j] = partial[2 * j] + partial[2 * j + 1];
    }
    out[c] = partial[0];
  }
}

// Calls f(row, weight) for every valid corner of the task's samples, row being the corner's value row and weight
// attention * bilinear weight. Out-of-map corners are skipped, not multiplied by 0: they never read memory.
template <typename scalar_t, typename F>
inline void for_each_corner(const Problem<scalar_t>& pb, int64_t b, int64_t m, int64_t task, F&& f) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Sizes& n = pb.n;
  const int64_t row_stride = n.heads * n.channels;
  const int64_t samples = n.levels * n.points;
  const scalar_t* loc = pb.locations + task * samples * 2;
  const scalar_t* w = pb.weights + task * samples;
  for (int64_t l = 0; l < n.levels; ++l) {
    const int64_t height = pb.shapes[2 * l], width = pb.shapes[2 * l + 1];
    const scalar_t* level_value = pb.value + (b * n.rows + pb.starts[l]) * row_stride + m * n.channels;
    for (int64_t p = 0; p < n.points; ++p) {
      const int64_t k = l * n.points + p;
      Bilinear<opmath_t> s;
      if (!bilinear_setup(static_cast<opmath_t>(loc[2 * k]), static_cast<opmath_t>(loc[2 * k + 1]), height, width,
                          s)) {
        continue;
      }
      const opmath_t attention = static_cast<opmath_t>(w[k]);
      for (int c = 0; c < 4; ++c) {
        if (s.valid[c]) f(level_value + s.index[c] * row_stride, attention * s.weight[c]);
      }
    }
  }
}

// Forward of one task when D is NV whole vectors (NV <= 4; D = 32 with AVX2): the corners are summed as they are set
// up, into accumulators that stay in registers.
template <int NV, typename scalar_t>
inline void forward_task_in_registers(const Problem<scalar_t>& pb, int64_t b, int64_t m, int64_t task,
                                      scalar_t* out) {
  using IO = Io<scalar_t>;
  using vec = typename IO::vec;
  vec acc[NV] = {};
  for_each_corner(pb, b, m, task, [&](const scalar_t* row, at::opmath_type<scalar_t> weight) {
    const vec weight_v = IO::V::broadcast(weight);
    for (int k = 0; k < NV; ++k) acc[k] += weight_v * IO::load(row + k * IO::lanes);
  });
  for (int k = 0; k < NV; ++k) IO::store(out + k * IO::lanes, acc[k]);
}

// Forward tasks [begin, end) of B * M * Q, task t = (b * M + m) * Q + q: consecutive tasks share a head, so a
// thread's chunk reads one head's value rows (S * D elements, 688 KiB at Mask2Former's 512x512 fp32 shape) and keeps
// them in its L2 cache; with locations near the query, neighbouring queries also share most corner rows.
template <typename scalar_t>
void forward_tasks(const Problem<scalar_t>& pb, scalar_t* output, int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  using vec = typename IO::vec;
  constexpr int64_t lanes = IO::lanes;
  const Sizes& n = pb.n;
  const int64_t whole_vectors = n.channels % lanes == 0 ? n.channels / lanes : 0;
  // Other channel counts: the task's valid corners (value rows and weights) first, then summed channel-block-wise.
  std::vector<const scalar_t*> rows(whole_vectors >= 1 && whole_vectors <= 4 ? 0 : 4 * n.levels * n.points);
  std::vector<opmath_t> row_weights(rows.size());
  for (int64_t t = begin; t < end; ++t) {
    const int64_t q = t % n.queries;
    const int64_t m = (t / n.queries) % n.heads;
    const int64_t b = t / (n.queries * n.heads);
    const int64_t task = (b * n.queries + q) * n.heads + m;  // (b, q, m) in the [B, Q, M] layouts
    scalar_t* out = output + task * n.channels;
    switch (rows.empty() ? whole_vectors : 0) {
      case 1:
        forward_task_in_registers<1>(pb, b, m, task, out);
        continue;
      case 2:
        forward_task_in_registers<2>(pb, b, m, task, out);
        continue;
      case 3:
        forward_task_in_registers<3>(pb, b, m, task, out);
        continue;
      case 4:
        forward_task_in_registers<4>(pb, b, m, task, out);
        continue;
      default:
        break;
    }
    int64_t count = 0;
    for_each_corner(pb, b, m, task, [&](const scalar_t* row, opmath_t weight) {
      rows[count] = row;
      row_weights[count] = weight;
      ++count;
    });
    const int64_t tail = for_vector_blocks<lanes>(n.channels, [&](auto blocks, int64_t d) {
      constexpr int NV = decltype(blocks)::value;
      vec acc[NV] = {};
      for (int64_t i = 0; i < count; ++i) {
        const vec weight = V::broadcast(row_weights[i]);
        const scalar_t* row = rows[i] + d;
        for (int k = 0; k < NV; ++k) acc[k] += weight * IO::load(row + k * lanes);
      }
      for (int k = 0; k < NV; ++k) IO::store(out + d + k * lanes, acc[k]);
    });
    for (int64_t d = tail; d < n.channels; ++d) {
      opmath_t acc = 0;
      for (int64_t i = 0; i < count; ++i) acc += row_weights[i] * static_cast<opmath_t>(rows[i][d]);
      out[d] = static_cast<scalar_t>(acc);
    }
  }
}

// A few queries ahead: a unit reads grad_output and the locations with a stride of a whole query (M * D resp.
// M * L * P * 2 elements), which the hardware prefetchers follow poorly.
constexpr int64_t kPrefetchQueries = 16;

// Backward units [begin, end) of B * M * L, unit u = (b * M + m) * L + l. A unit owns grad_value[b, rows of level l,
// m, :] (disjoint from every other unit's rows) and the location/attention gradients of its Q * P samples, and visits
// its samples in a fixed order, so the gradients are bit-identical whatever the number of threads. It also zeroes its
// rows first and, for bf16/fp16, rounds its float accumulator rows into grad_value last: no pass over the whole
// tensors outside the units.
template <typename scalar_t>
void backward_units(const Problem<scalar_t>& pb, const Gradients<scalar_t>& gr, int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  using vec = typename IO::vec;
  constexpr int64_t lanes = IO::lanes;
  constexpr bool reduced = !std::is_same_v<scalar_t, opmath_t>;
  const Sizes& n = pb.n;
  const int64_t row_stride = n.heads * n.channels;
  const int64_t samples = n.levels * n.points;
  std::vector<opmath_t> grad_buffer(reduced ? n.channels : 0);
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t l = unit % n.levels;
    const int64_t m = (unit / n.levels) % n.heads;
    const int64_t b = unit / (n.levels * n.heads);
    const int64_t height = pb.shapes[2 * l], width = pb.shapes[2 * l + 1];
    const int64_t level_offset = (b * n.rows + pb.starts[l]) * row_stride + m * n.channels;
    const scalar_t* level_value = pb.value + level_offset;
    opmath_t* level_grad = gr.grad_value_acc + level_offset;
    for (int64_t r = 0; r < height * width; ++r) {
      std::memset(level_grad + r * row_stride, 0, n.channels * sizeof(opmath_t));
    }
    for (int64_t q = 0; q < n.queries; ++q) {
      const int64_t task = (b * n.queries + q) * n.heads + m;  // (b, q, m)
      const scalar_t* g_in = gr.grad_output + task * n.channels;
#if defined(__GNUC__)
      if (q + kPrefetchQueries < n.queries) {
        const scalar_t* g_ahead = g_in + kPrefetchQueries * n.heads * n.channels;
        for (int64_t d = 0; d < n.channels; d += 64 / sizeof(scalar_t)) __builtin_prefetch(g_ahead + d);
        const int64_t k_ahead = (task + kPrefetchQueries * n.heads) * samples + l * n.points;
        __builtin_prefetch(pb.locations + 2 * k_ahead);
        __builtin_prefetch(pb.weights + k_ahead);
      }
#endif
      const opmath_t* g;
      if constexpr (reduced) {
        for (int64_t d = 0; d < n.channels; ++d) grad_buffer[d] = static_cast<opmath_t>(g_in[d]);
        g = grad_buffer.data();
      } else {
        g = g_in;
      }
      for (int64_t p = 0; p < n.points; ++p) {
        const int64_t k = task * samples + l * n.points + p;  // (b, q, m, l, p)
        Bilinear<opmath_t> s;
        opmath_t grad_attention = 0, grad_x = 0, grad_y = 0;
        if (bilinear_setup(static_cast<opmath_t>(pb.locations[2 * k]), static_cast<opmath_t>(pb.locations[2 * k + 1]),
                           height, width, s)) {
          const opmath_t attention = static_cast<opmath_t>(pb.weights[k]);
          // dot[c] = <grad_output, value row of corner c>; every valid corner's row gets attention * weight * grad.
          vec dot_lanes[4] = {};
          opmath_t dot_tail[4] = {0, 0, 0, 0};
          for (int c = 0; c < 4; ++c) {
            if (!s.valid[c]) continue;
            const int64_t offset = s.index[c] * row_stride;
            const scalar_t* value_row = level_value + offset;
            opmath_t* grad_row = level_grad + offset;
            const opmath_t scale = attention * s.weight[c];
            const vec scale_v = V::broadcast(scale);
            const int64_t tail = for_vector_blocks<lanes>(n.channels, [&](auto blocks, int64_t d) {
              constexpr int NV = decltype(blocks)::value;
              vec acc[NV];
              for (int j = 0; j < NV; ++j) {
                const int64_t at = d + j * lanes;
                const vec gv = V::load(g + at);
                acc[j] = gv * IO::load(value_row + at);
                V::store(grad_row + at, V::load(grad_row + at) + scale_v * gv);
              }
              for (int j = 1; j < NV; ++j) acc[0] += acc[j];
              dot_lanes[c] += acc[0];
            });
            for (int64_t d = tail; d < n.channels; ++d) {
              dot_tail[c] += g[d] * static_cast<opmath_t>(value_row[d]);
              grad_row[d] += scale * g[d];
            }
          }
          opmath_t dot[4];
          lane_sums4<opmath_t>(dot_lanes, dot);
          for (int c = 0; c < 4; ++c) dot[c] += dot_tail[c];
          sample_gradients(s, dot, attention, height, width, &grad_attention, &grad_x, &grad_y);
        }
        gr.grad_weights[k] = static_cast<scalar_t>(grad_attention);
        gr.grad_locations[2 * k] = static_cast<scalar_t>(grad_x);
        gr.grad_locations[2 * k + 1] = static_cast<scalar_t>(grad_y);
      }
    }
    if constexpr (reduced) {
      scalar_t* level_out = gr.grad_value + level_offset;
      for (int64_t r = 0; r < height * width; ++r) {
        const opmath_t* src = level_grad + r * row_stride;
        scalar_t* dst = level_out + r * row_stride;
        const int64_t tail = for_vector_blocks<lanes>(n.channels, [&](auto blocks, int64_t d) {
          constexpr int NV = decltype(blocks)::value;
          for (int j = 0; j < NV; ++j) IO::store(dst + d + j * lanes, V::load(src + d + j * lanes));
        });
        for (int64_t d = tail; d < n.channels; ++d) dst[d] = static_cast<scalar_t>(src[d]);
      }
    }
  }
}
