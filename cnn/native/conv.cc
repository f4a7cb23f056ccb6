// Direct NHWC/HWIO convolutions for small channel counts, as XLA FFI handlers on the CPU.
//
// cnn_conv:   y[b,i,j,o]  = act(sum_{p,q,c} xpad[b,i+p,j+q,c] * w[p,q,c,o] + bias[o])  (stride 1)
// cnn_conv_dw: dw[p,q,c,o] = sum_{b,i,j} xpad[b,i+p,j+q,c] * g[b,i,j,o];  db[o] = sum g (bias=1)
// xpad is x zero-padded by (top, bottom, left, right); act is relu or the identity. With the
// attribute mask=1, each value of x (cnn_conv) or g (cnn_conv_dw) counts only where the same
// element of the extra operand m is > 0: the derivative of a relu whose output is m, applied as
// the values are read; with terms=1 also the cotangent t (B, 2, C) of batch-norm sums of m is
// added there, as x + t0 + 2 m t1 (copy_masked_terms). cnn_conv_dw with swap=1 (1x1 kernels,
// no padding) takes x and g in each other's places: the mask then applies to x, and
// db[c] = sum of (masked) x. A 1x1 kernel gradient with few output channels (10) and more input
// channels (32) is cheaper so, as the caller's transpose of dw: the lanes hold the wider side.
// The input gradient of cnn_conv is cnn_conv of g with the flipped, transposed kernel
// (cnn/native.py). Output channels are held in 8-lane vectors (GCC vector extensions: AVX2 or
// AVX-512 ymm registers, NEON pairs), several output columns at a time; images are shared among
// XLA's intra-op threads. A 3x3 cnn_conv with an even output and 4-16 channels each way runs
// Winograd F(2x2, 3x3) instead (winograd_image): 2.25x fewer multiplies, measured 1.1-1.6x
// faster per image; so does its kernel gradient with 8 or 16 input channels
// (winograd_dw_image). cnn_conv_pool_grads (below cnn_bn_pool_grad) takes both gradients of a
// relu'd conv under batch norm and a max pool at once; cnn_conv_pw and cnn_conv_pw_grads run a
// relu'd conv and a relu'd 1x1 conv after it as one call each way.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));

#if defined(__AVX512F__)
constexpr int kRegs = 32;
#else
constexpr int kRegs = 16;
#endif

// Images per partial sum of the kernel gradient: at least kDwGroup, and as many as make at most
// kDwGroups sums (each to zero and add; 16 per group measured faster than 4 on small layers).
// A function of the batch alone, so the bits do not depend on the threads.
constexpr int64_t kDwGroup = 4, kDwGroups = 8;

#if defined(__AVX512F__)
// The kernels whose outputs take 16 lanes or more (conv, Winograd, kernel gradient) run on
// 16-lane vectors where the machine has them: with_lanes. Each lane does what it does in v8.
typedef float v16 __attribute__((vector_size(64)));
#endif

// Lanes of a vector type (v8 or v16).
template <class V>
constexpr int kLanes = int(sizeof(V) / sizeof(float));

// kLanes<V> floats at p, any alignment.
template <class V>
inline V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

inline v8 load8(const float* p) { return loadv<v8>(p); }

template <class V>
inline void storev(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// f(std::integral_constant<int, CC>{}): CC = C where C is 8 or 16, the channel counts the
// Winograd kernels unroll at compile time, else 0 (C read at run time).
template <class F>
void with_channels(int64_t C, F&& f) {
  if (C == 16) return f(std::integral_constant<int, 16>{});
  if (C == 8) return f(std::integral_constant<int, 8>{});
  f(std::integral_constant<int, 0>{});
}

// f(std::integral_constant<int, NV>{}) for NV in 1..4 8-lane vectors (callers check nv <= 4).
template <class F>
void with_vectors(int64_t nv, F&& f) {
  switch (nv) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

// f(V{}, std::integral_constant<int, N>{}) for nv (1..MaxNV) 8-lane vectors: as nv / 2 16-lane
// vectors (the same nv * 8 lanes, side by side) where the machine has AVX-512 and nv is even.
// MaxNV 2 (the Winograd kernels' outputs) leaves the wider kernels uninstantiated.
template <int MaxNV = 4, class F>
void with_lanes(int64_t nv, F&& f) {
  static_assert(MaxNV == 2 || MaxNV == 4);
  using std::integral_constant;
  if constexpr (MaxNV == 2) {
#if defined(__AVX512F__)
    if (nv == 2) return f(v16{}, integral_constant<int, 1>{});
    return f(v8{}, integral_constant<int, 1>{});
#else
    if (nv == 2) return f(v8{}, integral_constant<int, 2>{});
    return f(v8{}, integral_constant<int, 1>{});
#endif
  } else {
#if defined(__AVX512F__)
    switch (nv) {
      case 1: return f(v8{}, integral_constant<int, 1>{});
      case 2: return f(v16{}, integral_constant<int, 1>{});
      case 3: return f(v8{}, integral_constant<int, 3>{});
      default: return f(v16{}, integral_constant<int, 2>{});
    }
#else
    with_vectors(nv, [&](auto n) { f(v8{}, n); });
#endif
  }
}

// f(std::integral_constant<int, R>{}) for the runtime count r in 1..N: the tail of a loop in
// blocks of a compile-time size, run as one block of its own size.
template <int N, class F>
void with_count(int64_t r, F&& f) {
  if constexpr (N > 0) {
    if (r == N) return f(std::integral_constant<int, N>{});
    with_count<N - 1>(r, f);
  }
}

// f(std::integral_constant<bool, RELU>{}, std::integral_constant<bool, STATS>{}): the flags
// of an epilogue, chosen at run time, as compile-time ones.
template <class F>
void with_flags(bool relu, bool stats, F&& f) {
  using Y = std::true_type;
  using N = std::false_type;
  if (relu) {
    if (stats) return f(Y{}, Y{});
    return f(Y{}, N{});
  }
  if (stats) return f(N{}, Y{});
  f(N{}, N{});
}

// rows x n floats (src, rows n apart) into rows `width` apart, the rest of each row zero.
inline void pack_rows(float* dst, const float* src, int64_t rows, int64_t n, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * width, src + r * n, sizeof(float) * n);
    std::fill(dst + r * width + n, dst + (r + 1) * width, 0.0f);
  }
}

// Runs body(item, worker) for item in [0, n) on the calling thread and the pool's threads.
// Items are claimed from a shared counter, so a busy pool thread never blocks the call.
template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, int64_t workers, F& body) {
  if (workers <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i, 0);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  F* fn = &body;
  auto run = [state, fn, n](int64_t worker) {
    for (int64_t i; (i = state->next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      (*fn)(i, worker);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t w = 1; w < workers; ++w) pool.Schedule([run, w]() { run(w); });
  run(0);
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

struct Geometry {
  int64_t B, H, W, C, KH, KW, O, Ho, Wo, pt, pl, Hp, Wp;
  bool padded() const { return Hp != H || Wp != W; }
  int64_t padded_image_size() const { return Hp * Wp * C; }
};

// n values of x, zeroed where m <= 0 (m == nullptr: copied as they are).
inline void copy_masked(float* dst, const float* x, const float* m, int64_t n) {
  if (!m) {
    std::memcpy(dst, x, sizeof(float) * n);
    return;
  }
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    *reinterpret_cast<v8u*>(dst + k) = load8(m + k) > 0.0f ? load8(x + k) : v8{};
  for (; k < n; ++k) dst[k] = m[k] > 0.0f ? x[k] : 0.0f;
}

// `pixels` pixels of C channels of x, each channel c as x + t[c] + 2 m t[C + c] where m > 0 and
// 0 elsewhere: the gradient a relu with batch-norm sums receives, with the sums' cotangent t.
inline void copy_masked_terms(float* dst, const float* x, const float* m, int64_t pixels,
                              int64_t C, const float* t) {
  for (int64_t p = 0; p < pixels; ++p, dst += C, x += C, m += C) {
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) {
      const v8 mv = load8(m + c), v = load8(x + c) + load8(t + c) + (mv + mv) * load8(t + C + c);
      *reinterpret_cast<v8u*>(dst + c) = mv > 0.0f ? v : v8{};
    }
    for (; c < C; ++c) dst[c] = m[c] > 0.0f ? x[c] + t[c] + (m[c] + m[c]) * t[C + c] : 0.0f;
  }
}

// sum[o] += src[k * n + o] for each o < n (at most 32), adding the rows k < rows in order, so
// each lane's sum is the same as a scalar loop's; the lanes' chains run side by side.
inline void add_rows(float* sum, const float* src, int64_t rows, int64_t n) {
  const int64_t full = n / 8;
  auto vectors = [&](auto nv_c) {
    constexpr int NV = decltype(nv_c)::value;
    v8 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = load8(sum + v * 8);
    for (int64_t k = 0; k < rows; ++k)
      for (int v = 0; v < NV; ++v) acc[v] += load8(src + k * n + v * 8);
    for (int v = 0; v < NV; ++v) *reinterpret_cast<v8u*>(sum + v * 8) = acc[v];
  };
  if (full > 0) with_vectors(full, vectors);
  float tail[8];
  const int64_t rest = n - full * 8;
  for (int64_t o = 0; o < rest; ++o) tail[o] = sum[full * 8 + o];
  for (int64_t k = 0; k < rows; ++k)
    for (int64_t o = 0; o < rest; ++o) tail[o] += src[k * n + full * 8 + o];
  for (int64_t o = 0; o < rest; ++o) sum[full * 8 + o] = tail[o];
}

typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));

// 8 places (uint8) as 8 int32 lanes: one vpmovzxbd (GCC's generic conversion goes byte by byte).
inline v8i load_places(const uint8_t* p) {
#if defined(__AVX2__) && defined(__FMA__)  // immintrin.h is included
  return v8i(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  u8x8 b;
  std::memcpy(&b, p, 8);
  return __builtin_convertvector(b, v8i);
#endif
}

// Zeroes the padding of an image padded as g says: the rows above and below, and the columns
// left and right of each row between (what the copy of the image into it leaves unwritten).
inline void zero_border(const Geometry& g, float* scratch) {
  const int64_t row = g.Wp * g.C, right = g.Wp - g.pl - g.W;
  std::fill(scratch, scratch + g.pt * row, 0.0f);
  std::fill(scratch + (g.pt + g.H) * row, scratch + g.Hp * row, 0.0f);
  for (int64_t i = g.pt; i < g.pt + g.H; ++i) {
    std::fill(scratch + i * row, scratch + i * row + g.pl * g.C, 0.0f);
    std::fill(scratch + (i + 1) * row - right * g.C, scratch + (i + 1) * row, 0.0f);
  }
}

// Batch norm's input gradient under a max pool over non-overlapping kh x kw windows (a: the
// normalized input, C channels): d = (c1 + a * c2) * w[b], plus gp * inv at the place `at` of
// each window's maximum; gp and at are (B, Hq, Wq, C), inv, c1 and c2 (C,), w (B,).
// cnn_bn_pool_grad writes d; cnn_conv_pool_grads makes it, 0 where a <= 0 (a relu's output),
// where its kernels read it.
struct PoolGrad {
  const float* gp;
  const uint8_t* at;
  const float *inv, *c1, *c2, *w;
  int64_t kh, kw, Hq, Wq;
};

// Row i of image b's d, W pixels of C = NV * 8 channels; with RELU, 0 where a <= 0. Window by
// window, place by place (no divisions per pixel), the coefficients held in registers.
template <int NV, bool RELU>
inline void pool_grad_row(float* dst, const float* a, int64_t i, int64_t W, const PoolGrad& p,
                          int64_t b) {
  constexpr int64_t C = NV * 8;
  v8 iv[NV], k1[NV], k2[NV];
  for (int v = 0; v < NV; ++v) {
    iv[v] = load8(p.inv + 8 * v);
    k1[v] = load8(p.c1 + 8 * v);
    k2[v] = load8(p.c2 + 8 * v);
  }
  const float w = p.w[b];
  const int64_t windows = i < p.Hq * p.kh ? p.Wq : 0, q = (b * p.Hq + i / p.kh) * p.Wq * C;
  const float* gq = p.gp + q;
  const uint8_t* atq = p.at + q;
  const int32_t k0 = int32_t((i % p.kh) * p.kw);
  int64_t j = 0;
  for (int64_t jq = 0; jq < windows; ++jq, gq += C, atq += C) {
    v8 gz[NV];
    v8i at[NV];
    for (int v = 0; v < NV; ++v) {
      gz[v] = load8(gq + 8 * v) * iv[v];
      at[v] = load_places(atq + 8 * v);
    }
    for (int32_t k = k0; k < k0 + p.kw; ++k, ++j, dst += C, a += C)
      for (int v = 0; v < NV; ++v) {
        const v8 av = load8(a + 8 * v);
        v8 d = (k1[v] + av * k2[v]) * w;
        d = d + (at[v] == k ? gz[v] : v8{});
        *reinterpret_cast<v8u*>(dst + 8 * v) = !RELU || av > 0.0f ? d : v8{};
      }
  }
  for (; j < W; ++j, dst += C, a += C)  // past the last window: no pooled gradient
    for (int v = 0; v < NV; ++v) {
      const v8 av = load8(a + 8 * v), d = (k1[v] + av * k2[v]) * w;
      *reinterpret_cast<v8u*>(dst + 8 * v) = !RELU || av > 0.0f ? d : v8{};
    }
}

// Row i of image b's d, W pixels of C channels (8-32); with relu, 0 where a <= 0.
inline void pool_grad_row(float* dst, const float* a, int64_t i, int64_t W, int64_t C,
                          const PoolGrad& p, int64_t b, bool relu) {
  with_vectors(C / 8, [&](auto nv) {
    if (relu) return pool_grad_row<nv, true>(dst, a, i, W, p, b);
    pool_grad_row<nv, false>(dst, a, i, W, p, b);
  });
}

// Image b's d, a being a relu's output (H x W x C), 0 where a <= 0, into scratch zero-padded
// as g says: what the input gradient in cnn_conv_pool_grads reads.
const float* pool_grad_image(const Geometry& g, const PoolGrad& p, const float* a, int64_t b,
                             float* scratch) {
  zero_border(g, scratch);
  for (int64_t i = 0; i < g.H; ++i)
    pool_grad_row(scratch + ((i + g.pt) * g.Wp + g.pl) * g.C, a + i * g.W * g.C, i, g.W, g.C,
                  p, b, true);
  return scratch;
}

// One image zero-padded and masked (m: its mask source, or nullptr) into scratch, with the
// terms t (nullptr: none; needs m) as copy_masked_terms adds them; x itself when there is
// neither padding nor mask.
const float* prepared_image(const Geometry& g, const float* x, const float* m, const float* t,
                            float* scratch) {
  if (!g.padded() && !m) return x;
  zero_border(g, scratch);
  for (int64_t i = 0; i < g.H; ++i) {
    float* dst = scratch + ((i + g.pt) * g.Wp + g.pl) * g.C;
    const int64_t k = i * g.W * g.C;
    if (t)
      copy_masked_terms(dst, x + k, m + k, g.W, g.C, t);
    else
      copy_masked(dst, x + k, m ? m + k : nullptr, g.W * g.C);
  }
  return scratch;
}

// relu as jnp.maximum(y, 0) gives it: NaN stays NaN and -0 stays -0 (vmaxps returns its second
// operand when either is NaN or both are zeros); one instruction instead of a compare and a mask.
inline v8 vrelu(v8 a) {
#if defined(__AVX__)
  return v8(_mm256_max_ps(__m256(v8{}), __m256(a)));
#else
  return a < 0.0f ? v8{} : a;
#endif
}

// a * b + c rounded once, whatever the compiler would contract.
inline v8 vfma(v8 a, v8 b, v8 c) {
#if defined(__FMA__)
  return v8(_mm256_fmadd_ps(__m256(a), __m256(b), __m256(c)));
#else
  return a * b + c;
#endif
}

#if defined(__AVX512F__)
inline v16 vrelu(v16 a) { return v16(_mm512_max_ps(__m512(v16{}), __m512(a))); }
inline v16 vfma(v16 a, v16 b, v16 c) {
  return v16(_mm512_fmadd_ps(__m512(a), __m512(b), __m512(c)));
}
#endif

// What cnn_conv does to each output vector: add the bias (packed in NV * 8 lanes), then relu;
// with stats, also add it and its square to the image's sums ([2][NV * 8]). RELU and STATS are
// compile-time, so the accumulators stay in registers through the epilogue.
struct Epilogue {
  const float* bias;
  float* stats;
};

// Output columns (or Winograd tiles) per block, for NV accumulator vectors each: as many as the
// registers hold beside NV weight vectors and two temporaries, at most 14.
template <int NV>
constexpr int kCols = std::max(1, std::min(14, (kRegs - NV - 2) / NV));

#if defined(__AVX512F__)
inline void store_first(float* p, v16 v, int64_t n) {
  _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), __m512(v));
}
#endif

// The first n (1-7) lanes of v to p.
inline void store_first(float* p, v8 v, int64_t n) {
#if defined(__AVX512VL__)
  _mm256_mask_storeu_ps(p, __mmask8((1u << n) - 1), __m256(v));
#else
  for (int64_t k = 0; k < n; ++k) p[k] = v[k];
#endif
}

// The epilogue of XB output columns: bias, relu, stats, then the stores. A ragged last vector
// is stored whole where its lanes fit before yend: its extra lanes land on later pixels'
// outputs, which their own stores write afterwards.
template <class V, int NV, int XB, bool RELU, bool STATS>
inline void store_block(const Geometry& g, const Epilogue& e, V (&acc)[XB][NV], float* yout,
                        const float* yend) {
  constexpr int L = kLanes<V>;
  const int64_t O = g.O, full = O / L, rest = O % L;  // full vectors of output, lanes after
  V s1[NV], s2[NV];  // the sums, in registers: the output stores may alias e.stats
  if (STATS)
    for (int v = 0; v < NV; ++v) {
      s1[v] = loadv<V>(e.stats + v * L);
      s2[v] = loadv<V>(e.stats + (NV + v) * L);
    }
#pragma GCC unroll 16
  for (int i = 0; i < XB; ++i) {
    float* yo = yout + i * O;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      V a = acc[i][v] + loadv<V>(e.bias + v * L);
      if (RELU) a = vrelu(a);
      if (STATS) {
        s1[v] += a;
        s2[v] = vfma(a, a, s2[v]);
      }
      if (v < full || yo + (v + 1) * L <= yend)
        storev(yo + v * L, a);
      else
        store_first(yo + v * L, a, rest);
    }
  }
  if (STATS)
    for (int v = 0; v < NV; ++v) {
      storev(e.stats + v * L, s1[v]);
      storev(e.stats + (NV + v) * L, s2[v]);
    }
}

// Input offsets of the kernel taps t = (p * KW + q) * C + c from an output pixel's window.
std::vector<int64_t> tap_offsets(const Geometry& g) {
  std::vector<int64_t> off(g.KH * g.KW * g.C);
  for (int64_t p = 0; p < g.KH; ++p)
    for (int64_t q = 0; q < g.KW; ++q)
      for (int64_t c = 0; c < g.C; ++c) off[(p * g.KW + q) * g.C + c] = (p * g.Wp + q) * g.C + c;
  return off;
}

// XB output columns of one output row; wp is the kernel packed as [KH*KW*C][NV*L]. One loop
// over the taps (offsets off), in the order (p, q, c): nested loops over p, q and c ran 1.45x
// slower at 16 channels (3x3x16 -> 8), and worse at 1.
template <class V, int NV, int XB, bool RELU, bool STATS>
inline void conv_block(const Geometry& g, const Epilogue& e, const int64_t* off, const float* xin,
                       const float* wp, float* yout, const float* yend) {
  constexpr int L = kLanes<V>;
  V acc[XB][NV];
  for (int i = 0; i < XB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  const int64_t C = g.C, taps = g.KH * g.KW * g.C;
  for (int64_t t = 0; t < taps; ++t) {
    const float* xr = xin + off[t];
    V wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = loadv<V>(wp + (t * NV + v) * L);
    for (int i = 0; i < XB; ++i) {
      const float s = xr[i * C];
      for (int v = 0; v < NV; ++v) acc[i][v] += s * wv[v];
    }
  }
  store_block<V, NV, XB, RELU, STATS>(g, e, acc, yout, yend);
}

// Each output row in nb blocks of nearly equal width (at most XB columns): 26 columns run as
// 13 + 13, not 12 + 12 + 2.
template <class V, int NV, bool RELU, bool STATS>
void conv_image(const Geometry& g, const Epilogue& e, const int64_t* off, const float* xin,
                const float* wp, float* y) {
  constexpr int XB = kCols<NV>;
  const int64_t nb = (g.Wo + XB - 1) / XB, narrow = g.Wo / nb, wide = g.Wo % nb;
  const float* yend = y + g.Ho * g.Wo * g.O;
  for (int64_t i = 0; i < g.Ho; ++i) {
    const float* xrow = xin + i * g.Wp * g.C;
    float* yrow = y + i * g.Wo * g.O;
    for (int64_t k = 0, j = 0; k < nb; ++k) {
      const int64_t n = narrow + (k < wide);  // the first `wide` blocks take one more column
      with_count<XB>(n, [&](auto r) {
        conv_block<V, NV, r, RELU, STATS>(g, e, off, xrow + j * g.C, wp, yrow + j * g.O, yend);
      });
      j += n;
    }
  }
}

// conv_image with the flags chosen at run time.
template <class V, int NV>
void conv_image(const Geometry& g, const Epilogue& e, bool relu, const int64_t* off,
                const float* xin, const float* wp, float* y) {
  with_flags(relu, e.stats != nullptr, [&](auto relu_c, auto stats_c) {
    conv_image<V, NV, relu_c, stats_c>(g, e, off, xin, wp, y);
  });
}

// dw partial sums of one image for TB consecutive kernel taps t = (p * KW + q) * C + c, whose
// input offsets from the output pixel are off[k]: TB x NV accumulators over all output pixels,
// whatever C is (one input channel fills them with taps, many with channels).
// Contiguous: the taps are consecutive channels of one (p, q), so the offsets are off[0] + k,
// known to the compiler (fewer registers than eight loaded offsets).
// db (or nullptr): the bias gradient's NV * 8 lanes, to which g is added pixel by pixel in the
// same loop, as add_rows would add it.
template <class V, int NV, int TB, bool Contiguous, bool DB>
inline void dw_block(const Geometry& g, const float* xin, const float* gp, const int64_t* off,
                     float* out, float* db) {
  constexpr int L = kLanes<V>;
  V acc[TB][NV], bacc[NV];
  int64_t o[TB];
  for (int k = 0; k < TB; ++k) {
    o[k] = Contiguous ? off[0] + k : off[k];
    for (int v = 0; v < NV; ++v) acc[k][v] = V{};
  }
  if (DB)
    for (int v = 0; v < NV; ++v) bacc[v] = loadv<V>(db + v * L);
  const int64_t C = g.C;
  for (int64_t i = 0; i < g.Ho; ++i) {
    const float* xr = xin + i * g.Wp * C;
    const float* gr = gp + i * g.Wo * NV * L;
    for (int64_t j = 0; j < g.Wo; ++j) {
      V gv[NV];
      for (int v = 0; v < NV; ++v) gv[v] = loadv<V>(gr + (j * NV + v) * L);
      if (DB)
        for (int v = 0; v < NV; ++v) bacc[v] += gv[v];
      const float* xj = xr + j * C + (Contiguous ? o[0] : 0);
      for (int k = 0; k < TB; ++k) {
        const float s = Contiguous ? xj[k] : xj[o[k]];
        for (int v = 0; v < NV; ++v) acc[k][v] += s * gv[v];
      }
    }
  }
  for (int k = 0; k < TB; ++k)
    for (int v = 0; v < NV; ++v) {
      float* dst = out + (k * NV + v) * L;
      storev(dst, loadv<V>(dst) + acc[k][v]);
    }
  if (DB)
    for (int v = 0; v < NV; ++v) storev(db + v * L, bacc[v]);
}

// The taps in nb blocks of nearly equal size (at most TB each: one block for a 3x3 kernel on
// one channel, whose 9 accumulators then run side by side); db goes with the first block.
template <class V, int NV>
void dw_image(const Geometry& g, const int64_t* off, const float* xin, const float* gp,
              float* part, float* db) {
  constexpr int TB = std::max(1, std::min(NV == 1 ? 9 : 8, (kRegs - NV - 2) / NV));
  const int64_t taps = g.KH * g.KW * g.C, nb = (taps + TB - 1) / TB;
  const int64_t narrow = taps / nb, wide = taps % nb;
  for (int64_t k = 0, t = 0; k < nb; ++k) {
    const int64_t n = narrow + (k < wide);
    with_count<TB>(n, [&](auto r) {
      float* out = part + t * NV * kLanes<V>;
      const bool contiguous = off[t + r - 1] == off[t] + r - 1;
      if (k == 0 && db) {
        if (contiguous) return dw_block<V, NV, r, true, true>(g, xin, gp, &off[t], out, db);
        return dw_block<V, NV, r, false, true>(g, xin, gp, &off[t], out, db);
      }
      if (contiguous) return dw_block<V, NV, r, true, false>(g, xin, gp, &off[t], out, nullptr);
      dw_block<V, NV, r, false, false>(g, xin, gp, &off[t], out, nullptr);
    });
    t += n;
  }
}

// ------------------------------------------------------------------ Winograd F(2x2, 3x3)
// A 3x3 stride-1 conv whose output has even height and width, per 2x2 output tile d (its 4x4
// input patch): y = A^T [sum_c (G w_c G^T) .* (B^T d_c B)] A. 16 products per tile and
// channel pair instead of 36; the transforms are additions. Each image's tiles run in blocks
// of up to kCols<NV>: their inputs transformed, then 16 small products (one per place xi of
// the 4x4 transformed tile), then the outputs transformed, biased, relu'd, summed and stored.
// Used where measured faster than the direct kernel: 4-16 input and at most 16 output channels.
bool winograd_fits(const Geometry& g) {
  return g.KH == 3 && g.KW == 3 && g.Ho % 2 == 0 && g.Wo % 2 == 0 && g.C >= 4 && g.C <= 16 &&
         g.O <= 16;
}

// U[xi][c][lanes]: G w G^T for each (c, o), computed in double; xi = 4 * r + s.
std::vector<float> winograd_kernel(const float* w, int64_t C, int64_t O, int64_t lanes) {
  static const double G[4][3] = {{1, 0, 0}, {.5, .5, .5}, {.5, -.5, .5}, {0, 0, 1}};
  std::vector<float> U(16 * C * lanes, 0.0f);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t o = 0; o < O; ++o) {
      double gw[4][3];
      for (int r = 0; r < 4; ++r)
        for (int q = 0; q < 3; ++q) {
          gw[r][q] = 0.0;
          for (int p = 0; p < 3; ++p) gw[r][q] += G[r][p] * w[((p * 3 + q) * C + c) * O + o];
        }
      for (int r = 0; r < 4; ++r)
        for (int s = 0; s < 4; ++s) {
          double u = 0.0;
          for (int q = 0; q < 3; ++q) u += gw[r][q] * G[s][q];
          U[((r * 4 + s) * C + c) * lanes + o] = float(u);
        }
    }
  return U;
}

// The first n (1-8) floats at p, the other lanes zero; reads nothing past p + n.
inline v8 load_first(const float* p, int64_t n) {
  if (n >= 8) return load8(p);
#if defined(__AVX512VL__)
  return v8(_mm256_maskz_loadu_ps(__mmask8((1u << n) - 1), p));
#else
  v8 v{};
  for (int64_t k = 0; k < n; ++k) v[k] = p[k];
  return v;
#endif
}

// B^T d for one column of a tile's 4x4 patch (rows `row` floats apart): u0..u3, 8 channels.
inline void winograd_column(const float* q, int64_t row, int64_t n, v8 (&u)[4][4], int j) {
  const v8 d0 = load_first(q, n), d1 = load_first(q + row, n);
  const v8 d2 = load_first(q + 2 * row, n), d3 = load_first(q + 3 * row, n);
  u[0][j] = d0 - d2;
  u[1][j] = d1 + d2;
  u[2][j] = d2 - d1;
  u[3][j] = d1 - d3;
}

// (B^T d) B of the tile from its four columns u into V[xi * stride], xi = 4 * i + j.
template <class Stride>
inline void winograd_rows(const v8 (&u)[4][4], float* V, Stride stride) {
  for (int i = 0; i < 4; ++i) {
    float* v = V + 4 * i * stride;
    *reinterpret_cast<v8u*>(v) = u[i][0] - u[i][2];
    *reinterpret_cast<v8u*>(v + stride) = u[i][1] + u[i][2];
    *reinterpret_cast<v8u*>(v + 2 * stride) = u[i][2] - u[i][1];
    *reinterpret_cast<v8u*>(v + 3 * stride) = u[i][1] - u[i][3];
  }
}

// B^T d B of the n tiles t0, t0 + 1, .. (row-major among the Ho / 2 x Wo / 2 tiles) of xin,
// padded as g says (Hp = Ho + 2, Wp = Wo + 2), into V[xi][k][Cp]: Cp = C rounded up to 8,
// places xi XB * Cp floats apart. CC: C (8 or 16) known at compile time, or 0: the 16 stores
// of a tile are then at constant offsets from one register (with a run-time stride, GCC kept
// their addresses in vector registers, and moving them back took a third of the time).
template <int XB, int CC>
inline void winograd_inputs_c(const Geometry& g, const float* xin, int64_t t0, int64_t n,
                              float* V) {
  const int64_t C = CC ? CC : g.C, Cp = CC ? CC : (C + 7) / 8 * 8, tw = g.Wo / 2,
                row = g.Wp * C;
  const auto stride = [&] {
    if constexpr (CC != 0)
      return std::integral_constant<int64_t, XB * CC>{};
    else
      return XB * Cp;
  }();
  for (int64_t c0 = 0; c0 < C; c0 += 8) {  // a tile's last two columns are the next's first
    v8 u[4][4];
    for (int64_t k = 0, ti = t0 / tw, tj = t0 % tw; k < n; ++k, tj = tj + 1 < tw ? tj + 1 : 0) {
      if (k > 0 && tj == 0) ++ti;
      const float* p = xin + 2 * ti * row + 2 * tj * C + c0;
      if (k == 0 || tj == 0) {
        winograd_column(p, row, C - c0, u, 0);
        winograd_column(p + C, row, C - c0, u, 1);
      } else {
        for (int i = 0; i < 4; ++i) {
          u[i][0] = u[i][2];
          u[i][1] = u[i][3];
        }
      }
      winograd_column(p + 2 * C, row, C - c0, u, 2);
      winograd_column(p + 3 * C, row, C - c0, u, 3);
      winograd_rows(u, V + k * Cp + c0, stride);
    }
  }
}

template <int XB>
inline void winograd_inputs(const Geometry& g, const float* xin, int64_t t0, int64_t n,
                            float* V) {
  with_channels(g.C, [&](auto cc) { winograd_inputs_c<XB, cc>(g, xin, t0, n, V); });
}

// M[k][NV * L] = sum_c V[k][c] * U[c][NV * L] for the XB tiles k of a block (V rows Cp apart).
// CC: C (= Cp) known at compile time (8 or 16: the rows' addresses are then immediate offsets
// from one register, not 14 registers spilled to the stack), or 0.
template <class Vec, int NV, int XB, int CC>
inline void winograd_product(const float* V, int64_t Cp_, int64_t C_, const float* U, float* M) {
  constexpr int L = kLanes<Vec>;
  const int64_t Cp = CC ? CC : Cp_, C = CC ? CC : C_;
  Vec acc[XB][NV];
  for (int i = 0; i < XB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = Vec{};
  for (int64_t c = 0; c < C; ++c) {
    Vec uv[NV];
    for (int v = 0; v < NV; ++v) uv[v] = loadv<Vec>(U + (c * NV + v) * L);
    for (int i = 0; i < XB; ++i) {
      const float s = V[i * Cp + c];
      for (int v = 0; v < NV; ++v) acc[i][v] += s * uv[v];
    }
  }
  for (int i = 0; i < XB; ++i)
    for (int v = 0; v < NV; ++v) storev(M + (i * NV + v) * L, acc[i][v]);
}

// Floats of scratch winograd_image needs: V and M for a block of kCols<1> tiles, the most.
int64_t winograd_scratch(const Geometry& g) {
  const int64_t nv = (g.O + 7) / 8, cp = (g.C + 7) / 8 * 8;
  return 16 * kCols<1> * (cp + nv * 8);
}

// One image: xin padded (Hp = Ho + 2, Wp = Wo + 2), U from winograd_kernel, work: scratch of
// winograd_scratch(g) floats.
template <class Vo, int NV, bool RELU, bool STATS>
void winograd_image(const Geometry& g, const Epilogue& e, const float* xin, const float* U,
                    float* y, float* work) {
  constexpr int XB = kCols<NV>, L = kLanes<Vo>;  // the output's vectors: NV of L lanes
  const int64_t C = g.C, Cp = (C + 7) / 8 * 8, O = g.O, full = O / L, rest = O % L;
  const int64_t tw = g.Wo / 2, tiles = g.Ho / 2 * tw;
  const int64_t nb = (tiles + XB - 1) / XB, narrow = tiles / nb, wide = tiles % nb;
  float* V = work;                 // [16][XB][Cp]
  float* M = work + 16 * XB * Cp;  // [16][XB][NV * L]
  Vo s1[NV], s2[NV], bias[NV];
  for (int v = 0; v < NV; ++v) {
    bias[v] = loadv<Vo>(e.bias + v * L);
    if (STATS) {
      s1[v] = loadv<Vo>(e.stats + v * L);
      s2[v] = loadv<Vo>(e.stats + (NV + v) * L);
    }
  }
  for (int64_t b = 0, t0 = 0; b < nb; ++b) {
    const int64_t n = narrow + (b < wide);
    winograd_inputs<XB>(g, xin, t0, n, V);
    with_count<XB>(n, [&](auto r) {
      with_channels(C, [&](auto cc) {
        for (int xi = 0; xi < 16; ++xi)
          winograd_product<Vo, NV, r, cc>(V + xi * XB * Cp, Cp, C, U + xi * C * NV * L,
                                           M + xi * XB * NV * L);
      });
    });
    for (int64_t k = 0, ti = t0 / tw, tj = t0 % tw; k < n; ++k, tj = tj + 1 < tw ? tj + 1 : 0) {
      if (k > 0 && tj == 0) ++ti;
      float* yo = y + (2 * ti * g.Wo + 2 * tj) * O;
      for (int v = 0; v < NV; ++v) {
        const float* m = M + (k * NV + v) * L;
        const int64_t xs = XB * NV * L;  // between places xi
        Vo t[2][4];
        for (int j = 0; j < 4; ++j) {
          const Vo m0 = loadv<Vo>(m + j * xs), m1 = loadv<Vo>(m + (4 + j) * xs);
          const Vo m2 = loadv<Vo>(m + (8 + j) * xs), m3 = loadv<Vo>(m + (12 + j) * xs);
          t[0][j] = m0 + m1 + m2;
          t[1][j] = m1 - m2 - m3;
        }
        Vo out[4];
        for (int i = 0; i < 2; ++i) {
          out[2 * i] = t[i][0] + t[i][1] + t[i][2];
          out[2 * i + 1] = t[i][1] - t[i][2] - t[i][3];
        }
        for (int q = 0; q < 4; ++q) {
          Vo a = out[q] + bias[v];
          if (RELU) a = vrelu(a);
          if (STATS) {
            s1[v] += a;
            s2[v] = vfma(a, a, s2[v]);
          }
          float* dst = yo + ((q / 2) * g.Wo + q % 2) * O + v * L;
          if (v < full)
            storev(dst, a);
          else
            store_first(dst, a, rest);
        }
      }
    }
    t0 += n;
  }
  if (STATS)
    for (int v = 0; v < NV; ++v) {
      storev(e.stats + v * L, s1[v]);
      storev(e.stats + (NV + v) * L, s2[v]);
    }
}

template <class Vo, int NV>
void winograd_image(const Geometry& g, const Epilogue& e, bool relu, const float* xin,
                    const float* U, float* y, float* work) {
  with_flags(relu, e.stats != nullptr, [&](auto relu_c, auto stats_c) {
    winograd_image<Vo, NV, relu_c, stats_c>(g, e, xin, U, y, work);
  });
}

// The kernel gradient of the same conv, by the transpose of those transforms: dw = G^T [sum
// over tiles (A g A^T) .* (B^T d B)] G, g the tile's 2x2 output gradient. The sums (16 per
// channel pair instead of 36 products per tile) run in the transformed domain, per fixed group
// of images as cnn_conv_dw's do; G^T . G is applied once, in double, after the groups are
// added (DwPlan::finish). C is 8 or 16. Tiles run in blocks of kWdTiles, their inputs'
// transforms kept in scratch.
constexpr int64_t kWdTiles = 12;

// Floats of scratch winograd_dw_image needs: V for a block of tiles.
int64_t winograd_dw_scratch(const Geometry& g) { return 16 * kWdTiles * g.C; }

// P[c][NV * L] += sum_k V[k][c] * t_k over the n tiles t0, t0 + 1, .. of a block, for CB
// channels (V rows C apart), at one place xi = 4 * R + S: t_k = (A' g A'^T)[R][S] of tile k's
// 2x2 gradient (rows grow floats apart), made as it is used (a few additions, no stores).
// A' = A with its last row negated, [[1, 0], [1, 1], [1, -1], [0, 1]]: winograd_dw_finish
// undoes the sign.
template <class Vec, int NV, int CB, int R, int S>
inline void winograd_dw_place(const float* V, int64_t C, const float* gp, int64_t grow,
                              int64_t t0, int64_t n, int64_t tw, float* P) {
  constexpr int L = kLanes<Vec>;
  Vec acc[CB][NV];
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < NV; ++v) acc[c][v] = loadv<Vec>(P + (c * NV + v) * L);
  for (int64_t k = 0, ti = t0 / tw, tj = t0 % tw; k < n; ++k, tj = tj + 1 < tw ? tj + 1 : 0) {
    if (k > 0 && tj == 0) ++ti;
    const float* q = gp + 2 * ti * grow + 2 * tj * NV * L;
    Vec t[NV];
    for (int v = 0; v < NV; ++v) {
      Vec x0, x1;  // row R of A' g: from g's rows 0 (a, b) and 1 (c, d)
      if (R == 0 || R == 3) {
        const float* r = R == 0 ? q : q + grow;
        x0 = loadv<Vec>(r + v * L);
        x1 = loadv<Vec>(r + (NV + v) * L);
      } else {
        const Vec a = loadv<Vec>(q + v * L), b = loadv<Vec>(q + (NV + v) * L);
        const Vec c = loadv<Vec>(q + grow + v * L), d = loadv<Vec>(q + grow + (NV + v) * L);
        x0 = R == 1 ? a + c : a - c;
        x1 = R == 1 ? b + d : b - d;
      }
      t[v] = S == 0 ? x0 : S == 1 ? x0 + x1 : S == 2 ? x0 - x1 : x1;
    }
    for (int c = 0; c < CB; ++c) {
      const float s = V[k * C + c];
      for (int v = 0; v < NV; ++v) acc[c][v] += s * t[v];
    }
  }
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < NV; ++v) storev(P + (c * NV + v) * L, acc[c][v]);
}

// f(std::integral_constant<int, xi>{}) for each place xi = 0 .. 15 of a 4x4 tile.
template <class F, int... XI>
inline void each_place(F&& f, std::integer_sequence<int, XI...>) {
  (f(std::integral_constant<int, XI>{}), ...);
}
template <class F>
inline void each_place(F&& f) {
  each_place(f, std::make_integer_sequence<int, 16>{});
}

// One image's sums into part[xi][C][NV * L]: xin padded as g says, gp its gradient (rows
// `grow` floats apart, pixels NV * L); db (or nullptr) as dw_block adds it, pixel by pixel.
template <class Vec, int NV>
void winograd_dw_image(const Geometry& g, const float* xin, const float* gp, int64_t grow,
                       float* part, float* db, float* work) {
  constexpr int L = kLanes<Vec>, XB = kWdTiles;
  constexpr int CB = kRegs == 32 && NV == 1 ? 16 : 8 / NV;  // channels per pass (at most)
  const int64_t C = g.C, cb = std::min<int64_t>(CB, C), tw = g.Wo / 2, tiles = g.Ho / 2 * tw;
  for (int64_t t0 = 0; t0 < tiles; t0 += XB) {
    const int64_t n = std::min<int64_t>(XB, tiles - t0);
    winograd_inputs<XB>(g, xin, t0, n, work);  // V[16][XB][C]
    each_place([&](auto xi) {
      constexpr int R = decltype(xi)::value / 4, S = decltype(xi)::value % 4;
      for (int64_t c0 = 0; c0 < C; c0 += cb) {
        const float* V = work + xi * XB * C + c0;
        float* P = part + (xi * C + c0) * NV * L;
        if (cb == CB)
          winograd_dw_place<Vec, NV, CB, R, S>(V, C, gp, grow, t0, n, tw, P);
        else
          winograd_dw_place<Vec, NV, CB / 2, R, S>(V, C, gp, grow, t0, n, tw, P);
      }
    });
  }
  if (db)
    for (int64_t i = 0; i < g.Ho; ++i) add_rows(db, gp + i * grow, g.Wo, NV * L);
}

// What cnn_conv computes once per call, before its images: the kernel packed for the direct
// loop ([taps][nv * 8]) or transformed for Winograd, the bias in nv * 8 lanes (b: nullptr for
// none) and the taps' offsets.
struct ConvPlan {
  Geometry g;
  int64_t nv;
  bool wino;
  std::vector<float> wp, bp;
  std::vector<int64_t> off;

  ConvPlan(const Geometry& geom, const float* w, const float* b)
      : g(geom), nv((geom.O + 7) / 8), wino(winograd_fits(geom)), bp(nv * 8, 0.0f) {
    if (wino) {
      wp = winograd_kernel(w, g.C, g.O, nv * 8);
    } else {
      wp.resize(g.KH * g.KW * g.C * nv * 8);
      pack_rows(wp.data(), w, g.KH * g.KW * g.C, g.O, nv * 8);
      off = tap_offsets(g);
    }
    if (b) pack_rows(bp.data(), b, 1, g.O, nv * 8);
  }
  int64_t work_size() const { return wino ? winograd_scratch(g) : 0; }
  // One image: xin padded as g says, y its output; sums: the image's ([2][nv * 8]) or nullptr.
  void image(float* sums, bool relu, const float* xin, float* y, float* work) const {
    const Epilogue e{bp.data(), sums};
    if (wino)  // at most 16 outputs
      with_lanes<2>(nv, [&](auto v, auto nv_c) {
        winograd_image<decltype(v), nv_c>(g, e, relu, xin, wp.data(), y, work);
      });
    else
      with_lanes(nv, [&](auto v, auto nv_c) {
        conv_image<decltype(v), nv_c>(g, e, relu, off.data(), xin, wp.data(), y);
      });
  }
};

// dw[p][q][c][o] = sum_{r,s} G[r][p] G[s][q] m[4 * r + s][c][o], in double: the kernel
// gradient from winograd_dw_image's sums (m: [16][C][O]; G's last row negated, as A' is).
void winograd_dw_finish(const float* m, int64_t C, int64_t O, float* dw) {
  static const double G[4][3] = {{1, 0, 0}, {.5, .5, .5}, {.5, -.5, .5}, {0, 0, -1}};
  for (int64_t k = 0; k < C * O; ++k) {
    double h[4][3] = {};  // m . G, then G^T . that
    for (int r = 0; r < 4; ++r)
      for (int s = 0; s < 4; ++s)
        for (int q = 0; q < 3; ++q) h[r][q] += double(m[(4 * r + s) * C * O + k]) * G[s][q];
    for (int p = 0; p < 3; ++p)
      for (int q = 0; q < 3; ++q)
        dw[(p * 3 + q) * C * O + k] =
            float(G[0][p] * h[0][q] + G[1][p] * h[1][q] + G[2][p] * h[2][q] + G[3][p] * h[3][q]);
  }
}

// What cnn_conv_dw keeps per call: the taps' offsets and partial sums per fixed group of
// per_group images (dw, then db), added in a fixed order at the end: the result does not
// depend on which thread took which group, nor on the number of threads.
// A 3x3 kernel's gradient with an even output runs as Winograd (winograd_dw_image) where the
// forward does and C is 8 or 16 (measured 1.2-1.5x faster per image there; 10 channels padded
// to 16 ran slower than the direct loop): the partial sums are then [16][C][nv * 8] in the
// transformed domain.
struct DwPlan {
  Geometry g;
  int64_t nv;
  bool wino;
  int64_t dw_size, taps, per_group, groups;
  std::vector<int64_t> off;
  std::vector<float> part;

  explicit DwPlan(const Geometry& geom)
      : g(geom),
        nv((geom.O + 7) / 8),
        wino(winograd_fits(geom) && geom.C % 8 == 0),
        dw_size((wino ? 16 : geom.KH * geom.KW) * geom.C * nv * 8),
        taps(dw_size + (std::max(nv * 8, geom.C) + 7) / 8 * 8),  // db: whole vectors
        per_group(std::max(kDwGroup, (geom.B + kDwGroups - 1) / kDwGroups)),
        groups((geom.B + per_group - 1) / per_group),
        off(wino ? std::vector<int64_t>{} : tap_offsets(geom)),
        part(groups * taps, 0.0f) {}
  float* part_of(int64_t group) { return &part[group * taps]; }
  float* db_part_of(int64_t group) { return part_of(group) + dw_size; }
  int64_t first(int64_t group) const { return group * per_group; }
  int64_t end(int64_t group) const { return std::min(g.B, (group + 1) * per_group); }
  int64_t work_size() const { return wino ? winograd_dw_scratch(g) : 0; }
  // One image's sums into its group's: xin padded as g says, gp its gradient in nv * 8 lanes
  // (rows grow floats apart; 0: Wo * nv * 8); work: work_size() floats.
  void image(const float* xin, const float* gp, float* part_g, float* db_part, float* work,
             int64_t grow = 0) const {
    if (wino)
      with_lanes<2>(nv, [&](auto v, auto nv_c) {
        winograd_dw_image<decltype(v), nv_c>(g, xin, gp, grow ? grow : g.Wo * nv * 8, part_g,
                                             db_part, work);
      });
    else
      with_lanes(nv, [&](auto v, auto nv_c) {
        dw_image<decltype(v), nv_c>(g, off.data(), xin, gp, part_g, db_part);
      });
  }
  // The groups' sums, in group order: dw (KH, KW, C, O) and n_db values of db. Each output's
  // sum runs over the groups in order, 8 outputs side by side in a vector's lanes; Winograd's
  // then transformed back (in double).
  void finish(float* dw, float* db, int64_t n_db) const {
    const int64_t nt = dw_size / (nv * 8);
    float sum[32];  // one tap's nv * 8 lanes
    std::vector<float> m(wino ? nt * g.O : 0);
    for (int64_t t = 0; t < nt; ++t) {
      sum_groups(t * nv * 8, nv, sum);
      std::memcpy((wino ? m.data() : dw) + t * g.O, sum, sizeof(float) * g.O);
    }
    if (wino) winograd_dw_finish(m.data(), g.C, g.O, dw);
    for (int64_t o = 0; o < n_db; o += 8) {
      sum_groups(nt * nv * 8 + o, 1, sum);
      std::memcpy(db + o, sum, sizeof(float) * std::min<int64_t>(8, n_db - o));
    }
  }
  // sum[0 .. n * 8) = the groups' part[at ..] added in group order, lane by lane.
  void sum_groups(int64_t at, int64_t n, float* sum) const {
    with_vectors(n, [&](auto n_c) {
      constexpr int N = decltype(n_c)::value;
      v8 acc[N] = {};
      for (int64_t k = 0; k < groups; ++k)
        for (int v = 0; v < N; ++v) acc[v] += load8(&part[k * taps + at + 8 * v]);
      for (int v = 0; v < N; ++v) *reinterpret_cast<v8u*>(sum + 8 * v) = acc[v];
    });
  }
};

// The mask source m must have x's shape when mask is set.
bool same_dims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// 8, 16, 24 or 32: the channel counts of whole 8-lane vectors that the pooling kernels and the
// middle of cnn_conv_pw take.
bool whole_vectors(int64_t c) { return c % 8 == 0 && c >= 8 && c <= 32; }

int64_t workers_of(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

// One call's scratch, `workers` slots of each size asked for, carved from a buffer of the
// calling thread's that is kept between calls (a fresh allocation of this size is mmap'd, and
// its pages fault as they are first touched, at every call). Not zeroed.
class Scratch {
 public:
  explicit Scratch(int64_t workers) : workers_(workers) {}
  // Reserves workers slots of n floats (each at a multiple of 16); returns the id for at().
  int64_t add(int64_t n) {
    slots_.push_back({total_, (n + 15) / 16 * 16});
    total_ += workers_ * slots_.back().stride;
    return int64_t(slots_.size()) - 1;
  }
  // After the last add: the buffer, grown if need be.
  void allocate() {
    thread_local std::vector<float> buffer;
    if (int64_t(buffer.size()) < total_) buffer.resize(total_);
    base_ = buffer.data();
  }
  // Worker w's slot of reservation id; nullptr for a size of 0.
  float* at(int64_t id, int64_t w) const {
    const Slot& s = slots_[id];
    return s.stride ? base_ + s.offset + w * s.stride : nullptr;
  }

 private:
  struct Slot {
    int64_t offset, stride;
  };
  int64_t workers_, total_ = 0;
  std::vector<Slot> slots_;
  float* base_ = nullptr;
};

// Checks the terms operand t of cnn_conv and cnn_conv_dw: (B, 2, C) with the mask, or unused.
ffi::Error check_terms(ffi::Buffer<ffi::F32>& t, bool terms, bool mask, int64_t B, int64_t C,
                       const char* what) {
  if (terms && (!mask || int64_t(t.element_count()) != B * 2 * C))
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": terms need the mask and a (B, 2, C) operand");
  return ffi::Error::Success();
}

ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> t,
                    ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> s, int64_t pt,
                    int64_t pb, int64_t pl, int64_t pr, bool relu, bool mask, bool stats,
                    bool terms) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || wd[2] != xd[3])
    return ffi::Error::InvalidArgument("cnn_conv: expects NHWC x, HWIO w, NHWC y");
  if (int64_t(b.element_count()) != wd[3] || (mask && !same_dims(m.dimensions(), xd)))
    return ffi::Error::InvalidArgument("cnn_conv: expects bias (O,) and a mask source shaped as x");
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2],
             pt, pl, xd[1] + pt + pb, xd[2] + pl + pr};
  if (g.Ho != g.Hp - g.KH + 1 || g.Wo != g.Wp - g.KW + 1 || yd[0] != g.B || yd[3] != g.O)
    return ffi::Error::InvalidArgument("cnn_conv: output shape does not match the geometry");
  if (stats && int64_t(s->element_count()) != g.B * 2 * g.O)
    return ffi::Error::InvalidArgument("cnn_conv: expects stats shaped (B, 2, O)");
  if (auto e = check_terms(t, terms, mask, g.B, g.C, "cnn_conv"); e.failure()) return e;
  const int64_t nv = (g.O + 7) / 8;
  if (nv > 4) return ffi::Error::InvalidArgument("cnn_conv: at most 32 output channels");
  const ConvPlan plan(g, w.typed_data(), b.typed_data());
  const int64_t workers = workers_of(pool), img = g.padded_image_size();
  const int64_t wsize = plan.work_size();
  Scratch sc(workers);
  const int64_t s_work = sc.add(wsize), s_sums = sc.add(stats ? 2 * nv * 8 : 0),
                s_x = sc.add(g.padded() || mask ? img : 0);
  sc.allocate();
  const float* xs = x.typed_data();
  const float* ms = mask ? m.typed_data() : nullptr;
  const float* ts = terms ? t.typed_data() : nullptr;
  float* ys = y->typed_data();
  const int64_t x_img = g.H * g.W * g.C;
  auto body = [&](int64_t i, int64_t worker) {
    const float* xin = prepared_image(g, xs + i * x_img, ms ? ms + i * x_img : nullptr,
                                      ts ? ts + i * 2 * g.C : nullptr,
                                      sc.at(s_x, worker));
    float* image_sums = sc.at(s_sums, worker);
    if (stats) std::fill(image_sums, image_sums + 2 * nv * 8, 0.0f);
    float* yi = ys + i * g.Ho * g.Wo * g.O;
    plan.image(image_sums, relu, xin, yi, sc.at(s_work, worker));
    if (stats) {  // per image, so the bits do not depend on the threads
      float* out = s->typed_data() + i * 2 * g.O;
      for (int k = 0; k < 2; ++k)
        std::memcpy(out + k * g.O, image_sums + k * nv * 8, sizeof(float) * g.O);
    }
  };
  parallel_for(pool, g.B, workers, body);
  return ffi::Error::Success();
}

ffi::Error ConvDwImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gy,
                      ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> t,
                      ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> db, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr, bool mask, bool bias, bool swap,
                      bool terms) {
  auto xd = x.dimensions(), gd = gy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || wd[2] != xd[3] || gd[3] != wd[3])
    return ffi::Error::InvalidArgument("cnn_conv_dw: expects NHWC x and g, HWIO dw");
  if (int64_t(db->element_count()) != (swap ? wd[2] : wd[3]) ||
      (mask && !same_dims(m.dimensions(), swap ? xd : gd)))
    return ffi::Error::InvalidArgument(
        "cnn_conv_dw: expects db (O,) and a mask source shaped as g (swap: (C,), as x)");
  if (swap && (wd[0] != 1 || wd[1] != 1 || pt || pb || pl || pr))
    return ffi::Error::InvalidArgument("cnn_conv_dw: swap needs a 1x1 kernel and no padding");
  if (auto e = check_terms(t, terms, mask, xd[0], swap ? xd[3] : gd[3], "cnn_conv_dw");
      e.failure())
    return e;
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], gd[1], gd[2],
             pt, pl, xd[1] + pt + pb, xd[2] + pl + pr};
  if (g.Ho != g.Hp - g.KH + 1 || g.Wo != g.Wp - g.KW + 1 || gd[0] != g.B)
    return ffi::Error::InvalidArgument("cnn_conv_dw: gradient shape does not match the geometry");
  const int64_t nv = (g.O + 7) / 8;
  if (nv > 4) return ffi::Error::InvalidArgument("cnn_conv_dw: at most 32 output channels");
  const int64_t workers = workers_of(pool);
  DwPlan plan(g);
  const bool ragged = g.O % 8 != 0, copy_g = ragged || (mask && !swap);
  const bool copy_x = g.padded() || (mask && swap);
  const int64_t img = g.padded_image_size(), gimg = g.Ho * g.Wo * nv * 8;
  Scratch sc(workers);
  const int64_t s_x = sc.add(copy_x ? img : 0), s_g = sc.add(copy_g ? gimg : 0);
  const int64_t s_w = sc.add(plan.work_size());
  sc.allocate();
  const float* xs = x.typed_data();
  const float* gs = gy.typed_data();
  const float* ms = mask ? m.typed_data() : nullptr;
  const float* ts = terms ? t.typed_data() : nullptr;
  const int64_t g_img = g.Ho * g.Wo * g.O, x_img = g.H * g.W * g.C;
  auto body = [&](int64_t group, int64_t worker) {
    float* part_g = plan.part_of(group);
    for (int64_t b = plan.first(group); b < plan.end(group); ++b) {
      const float* xin = prepared_image(g, xs + b * x_img, swap && ms ? ms + b * x_img : nullptr,
                                        swap && ts ? ts + b * 2 * g.C : nullptr,
                                        sc.at(s_x, worker));
      const float* gp = gs + b * g_img;
      if (copy_g) {
        float* dst = sc.at(s_g, worker);
        if (ragged) std::fill(dst, dst + gimg, 0.0f);
        const float* mp = ms && !swap ? ms + b * g_img : nullptr;
        const float* tp = ts && !swap ? ts + b * 2 * g.O : nullptr;
        for (int64_t k = 0; k < g.Ho * g.Wo; ++k) {
          float* dk = dst + k * nv * 8;
          if (tp)
            copy_masked_terms(dk, gp + k * g.O, mp + k * g.O, 1, g.O, tp);
          else
            copy_masked(dk, gp + k * g.O, mp ? mp + k * g.O : nullptr, g.O);
        }
        gp = dst;
      }
      // the bias gradient: g summed over the pixels in dw's loop; with swap, x summed so
      float* db_part = bias ? plan.db_part_of(group) : nullptr;
      plan.image(xin, gp, part_g, swap ? nullptr : db_part, sc.at(s_w, worker));
      if (bias && swap) add_rows(db_part, xin, g.Ho * g.Wo, g.C);
    }
  };
  parallel_for(pool, plan.groups, workers, body);
  plan.finish(dw->typed_data(), db->typed_data(), int64_t(db->element_count()));
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- batch norm, then max pool
// Training's batch norm z = a * inv + shift (per channel) followed by a max pool over
// non-overlapping KH x KW windows (VALID: rows and columns past the last window are unused).
// cnn_bn_pool:       p = the first maximum of z in each window (row-major order, as
//                    lax.reduce_window's derivative takes it); idx = its place in the window;
//                    xa = a there (pooled-size, so that the sums need not read a again).
// cnn_bn_pool_sums:  per image and channel, sum g and sum g * (xa - mean): batch norm's two
//                    reductions of its output gradient, which is zero off those places.
// cnn_bn_pool_grad:  d = (c1 + a * c2) * w[b] + gz * inv, gz = g at the place, 0 elsewhere:
//                    batch norm's input gradient, with c1 and c2 computed from the sums
//                    (PoolGrad, pool_grad_row).
struct PoolGeometry {
  int64_t B, H, W, C, KH, KW, Ho, Wo;
  int64_t window(int64_t i, int64_t j) const { return (i * KH * W + j * KW) * C; }
  std::vector<int64_t> places() const {  // offset of each place in a window from its first
    std::vector<int64_t> off(KH * KW);
    for (int64_t k = 0; k < KH * KW; ++k) off[k] = ((k / KW) * W + k % KW) * C;
    return off;
  }
};

ffi::Error pool_geometry(ffi::Span<const int64_t> ad, ffi::Span<const int64_t> pd, int64_t kh,
                         int64_t kw, PoolGeometry& g) {
  if (ad.size() != 4 || pd.size() != 4 || kh < 1 || kw < 1 || kh * kw > 255)
    return ffi::Error::InvalidArgument("cnn_bn_pool: expects NHWC arrays, windows of 1-255");
  if (!whole_vectors(ad[3]))
    return ffi::Error::InvalidArgument("cnn_bn_pool: expects 8, 16, 24 or 32 channels");
  g = PoolGeometry{ad[0], ad[1], ad[2], ad[3], kh, kw, ad[1] / kh, ad[2] / kw};
  if (pd[0] != g.B || pd[1] != g.Ho || pd[2] != g.Wo || pd[3] != g.C)
    return ffi::Error::InvalidArgument("cnn_bn_pool: pooled shape does not match the input");
  return ffi::Error::Success();
}

// The channels are NV vectors of 8 (C = 8 * NV): each window is a few vector operations.
template <int NV>
void bn_pool_image(const PoolGeometry& g, const int64_t* off, const float* ab, const float* iv,
                   const float* sh, float* pb, uint8_t* ib, float* xb) {
  const int64_t C = g.C, K = g.KH * g.KW, band = g.KH * g.W * C;  // a row of windows' floats
  for (int64_t i = 0; i < g.Ho; ++i) {
    if (i + 1 < g.Ho)  // the next row of windows, while this one is pooled
      for (int64_t f = 0; f < band; f += 16) __builtin_prefetch(ab + (i + 1) * band + f);
    for (int64_t j = 0; j < g.Wo; ++j) {
      const float* aw = ab + g.window(i, j);
      const int64_t o = (i * g.Wo + j) * C;
      for (int v = 0; v < NV; ++v) {
        const v8 inv = load8(iv + 8 * v), shift = load8(sh + 8 * v);
        v8 xat = load8(aw + off[0] + 8 * v), best = xat * inv + shift;
        v8i at = v8i{};
        for (int64_t k = 1; k < K; ++k) {
          const v8 xk = load8(aw + off[k] + 8 * v), z = xk * inv + shift;
          const v8i more = z > best;  // strictly: the first maximum keeps its place
          best = more ? z : best;
          xat = more ? xk : xat;
          at = more ? v8i{} + int32_t(k) : at;
        }
        *reinterpret_cast<v8u*>(pb + o + 8 * v) = best;
        *reinterpret_cast<v8u*>(xb + o + 8 * v) = xat;
        const u8x8 at8 = __builtin_convertvector(at, u8x8);
        std::memcpy(ib + o + 8 * v, &at8, 8);
      }
    }
  }
}

// One image's sums from its n pooled places (gb: g, xb: a there), C = NV * 8 channels.
template <int NV>
void bn_pool_sums_image(int64_t n, const float* gb, const float* xb, const float* mu,
                        float* sb) {
  constexpr int64_t C = NV * 8;
  v8 s_g[NV], s_ga[NV], m[NV];
  for (int v = 0; v < NV; ++v) {
    s_g[v] = s_ga[v] = v8{};
    m[v] = load8(mu + 8 * v);
  }
  for (int64_t o = 0; o < n * C; o += C)
    for (int v = 0; v < NV; ++v) {
      const v8 gv = load8(gb + o + 8 * v);
      s_g[v] += gv;
      s_ga[v] += gv * (load8(xb + o + 8 * v) - m[v]);
    }
  for (int v = 0; v < NV; ++v) {
    *reinterpret_cast<v8u*>(sb + 8 * v) = s_g[v];
    *reinterpret_cast<v8u*>(sb + C + 8 * v) = s_ga[v];
  }
}

ffi::Error BnPoolImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> inv,
                      ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> p,
                      ffi::ResultBuffer<ffi::U8> idx, ffi::ResultBuffer<ffi::F32> xa, int64_t kh,
                      int64_t kw) {
  PoolGeometry g;
  if (auto e = pool_geometry(a.dimensions(), p->dimensions(), kh, kw, g); e.failure()) return e;
  if (!same_dims(xa->dimensions(), p->dimensions()) ||
      !same_dims(idx->dimensions(), p->dimensions()))
    return ffi::Error::InvalidArgument("cnn_bn_pool: expects places and values shaped as p");
  const std::vector<int64_t> off = g.places();
  const float *as = a.typed_data(), *iv = inv.typed_data(), *sh = shift.typed_data();
  float* ps = p->typed_data();
  uint8_t* is = idx->typed_data();
  float* xs = xa->typed_data();
  const int64_t n_in = g.H * g.W * g.C, n_out = g.Ho * g.Wo * g.C;
  auto body = [&](int64_t b, int64_t) {
    const float* ab = as + b * n_in;
    with_vectors(g.C / 8, [&](auto nv) {
      bn_pool_image<nv>(g, off.data(), ab, iv, sh, ps + b * n_out, is + b * n_out,
                        xs + b * n_out);
    });
  };
  parallel_for(pool, g.B, workers_of(pool), body);
  return ffi::Error::Success();
}

ffi::Error BnPoolSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gp,
                          ffi::Buffer<ffi::F32> xa, ffi::Buffer<ffi::F32> mean,
                          ffi::ResultBuffer<ffi::F32> s) {
  auto pd = gp.dimensions();
  if (pd.size() != 4 || !same_dims(xa.dimensions(), pd) || !whole_vectors(pd[3]) ||
      int64_t(mean.element_count()) != pd[3] ||
      int64_t(s->element_count()) != pd[0] * 2 * pd[3])
    return ffi::Error::InvalidArgument(
        "cnn_bn_pool_sums: expects NHWC g and xa of one shape with 8, 16, 24 or 32 channels,"
        " mean (C,) and sums (B, 2, C)");
  const int64_t C = pd[3], n = pd[1] * pd[2];
  const float *gs = gp.typed_data(), *xs = xa.typed_data(), *mu = mean.typed_data();
  float* ss = s->typed_data();
  auto body = [&](int64_t b, int64_t) {  // per image: the bits do not depend on the threads
    with_vectors(C / 8, [&](auto nv) {
      bn_pool_sums_image<nv>(n, gs + b * n * C, xs + b * n * C, mu, ss + b * 2 * C);
    });
  };
  parallel_for(pool, pd[0], workers_of(pool), body);
  return ffi::Error::Success();
}

ffi::Error BnPoolGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gp, ffi::Buffer<ffi::U8> idx,
                          ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> inv,
                          ffi::Buffer<ffi::F32> c1, ffi::Buffer<ffi::F32> c2,
                          ffi::Buffer<ffi::F32> wb, ffi::ResultBuffer<ffi::F32> d, int64_t kh,
                          int64_t kw) {
  PoolGeometry g;
  if (auto e = pool_geometry(a.dimensions(), gp.dimensions(), kh, kw, g); e.failure()) return e;
  if (!same_dims(d->dimensions(), a.dimensions()) || int64_t(wb.element_count()) != g.B)
    return ffi::Error::InvalidArgument("cnn_bn_pool_grad: expects d shaped as a, w as (B,)");
  const PoolGrad pg{gp.typed_data(), idx.typed_data(), inv.typed_data(), c1.typed_data(),
                    c2.typed_data(), wb.typed_data(), kh, kw, g.Ho, g.Wo};
  const float* as = a.typed_data();
  float* ds = d->typed_data();
  const int64_t row = g.W * g.C;
  auto body = [&](int64_t b, int64_t) {
    for (int64_t i = 0; i < g.H; ++i)  // every place, in a window or not
      pool_grad_row(ds + (b * g.H + i) * row, as + (b * g.H + i) * row, i, g.W, g.C, pg, b, false);
  };
  parallel_for(pool, g.B, workers_of(pool), body);
  return ffi::Error::Success();
}

// cnn_conv_pool_grads: dx, dw and db of a = relu(conv(x, w) + b) under batch norm and a max
// pool, from the pooled gradient: image by image, cnn_bn_pool_grad's gradient is made once
// (PoolGrad), into scratch, where the input gradient (the direct or Winograd kernel with the
// flipped kernel wf, HWOI) and the kernel gradient both read it. So that gradient is never
// written, nor made or read twice. The same values as cnn_conv and cnn_conv_dw taking it.
ffi::Error ConvPoolGradsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> wf, ffi::Buffer<ffi::F32> a,
                             ffi::Buffer<ffi::F32> gp, ffi::Buffer<ffi::U8> at,
                             ffi::Buffer<ffi::F32> inv, ffi::Buffer<ffi::F32> c1,
                             ffi::Buffer<ffi::F32> c2, ffi::Buffer<ffi::F32> wb,
                             ffi::ResultBuffer<ffi::F32> dx,
                             ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> db,
                             int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t kh,
                             int64_t kw, bool bias) {
  auto xd = x.dimensions(), fd = wf.dimensions(), ad = a.dimensions(), pd = gp.dimensions();
  if (xd.size() != 4 || fd.size() != 4 || ad.size() != 4 || pd.size() != 4 || fd[3] != xd[3] ||
      fd[2] != ad[3] || ad[0] != xd[0] || !same_dims(dx->dimensions(), xd) ||
      int64_t(dw->element_count()) != fd[0] * fd[1] * fd[2] * fd[3] ||
      int64_t(db->element_count()) != ad[3])
    return ffi::Error::InvalidArgument(
        "cnn_conv_pool_grads: expects NHWC x and a, the flipped kernel (KH, KW, O, C), dx shaped"
        " as x, dw (KH, KW, C, O) and db (O,)");
  if (kh < 1 || kw < 1 || !whole_vectors(ad[3]) || xd[3] > 32 || pd[0] != ad[0] ||
      pd[1] != ad[1] / kh || pd[2] != ad[2] / kw || pd[3] != ad[3] ||
      !same_dims(at.dimensions(), pd) || int64_t(inv.element_count()) != ad[3] ||
      int64_t(c1.element_count()) != ad[3] || int64_t(c2.element_count()) != ad[3] ||
      int64_t(wb.element_count()) != ad[0])
    return ffi::Error::InvalidArgument(
        "cnn_conv_pool_grads: expects 8, 16, 24 or 32 channels in a (at most 32 in x), the pooled"
        " gradient and places shaped (B, H / kh, W / kw, C) of a, inv, c1 and c2 (C,), w (B,)");
  const int64_t B = xd[0], KH = fd[0], KW = fd[1], C = xd[3], O = ad[3];
  const Geometry gf{B, xd[1], xd[2], C, KH, KW, O, ad[1], ad[2], pt, pl, xd[1] + pt + pb,
                    xd[2] + pl + pr};  // the forward conv's (and its kernel gradient's)
  if (gf.Ho != gf.Hp - KH + 1 || gf.Wo != gf.Wp - KW + 1 || pt >= KH || pb >= KH || pl >= KW ||
      pr >= KW)
    return ffi::Error::InvalidArgument(
        "cnn_conv_pool_grads: a's shape does not match the geometry (pads at most k - 1)");
  const int64_t fpt = KH - 1 - pt, fpl = KW - 1 - pl;  // the input gradient's: full padding
  const Geometry gx{B, gf.Ho, gf.Wo, O, KH, KW, C, gf.H, gf.W, fpt, fpl,
                    gf.Ho + fpt + KH - 1 - pb, gf.Wo + fpl + KW - 1 - pr};
  const PoolGrad pg{gp.typed_data(), at.typed_data(), inv.typed_data(), c1.typed_data(),
                    c2.typed_data(), wb.typed_data(), kh, kw, pd[1], pd[2]};
  const ConvPlan dx_plan(gx, wf.typed_data(), nullptr);
  DwPlan dw_plan(gf);
  const int64_t workers = workers_of(pool), gimg = gx.padded_image_size();
  const int64_t ximg = gf.padded_image_size(), wsize = dx_plan.work_size();
  const int64_t a_img = gf.Ho * gf.Wo * O, x_img = gf.H * gf.W * C;
  Scratch sc(workers);
  const int64_t s_g = sc.add(gimg), s_rows = sc.add(gx.padded() && !dw_plan.wino ? a_img : 0),
                s_x = sc.add(gf.padded() ? ximg : 0), s_work = sc.add(wsize),
                s_dw = sc.add(dw_plan.work_size());
  sc.allocate();
  const float *xs = x.typed_data(), *as = a.typed_data();
  float* dxs = dx->typed_data();
  auto body = [&](int64_t group, int64_t worker) {
    float* part_g = dw_plan.part_of(group);
    for (int64_t b = dw_plan.first(group); b < dw_plan.end(group); ++b) {
      const float* g = pool_grad_image(gx, pg, as + b * a_img, b, sc.at(s_g, worker));
      dx_plan.image(nullptr, false, g, dxs + b * x_img, sc.at(s_work, worker));
      int64_t grow = 0;  // the kernel gradient reads g's rows as they are (Winograd) or
      if (dw_plan.wino) {  // as rows of Wo * O floats
        g += (fpt * gx.Wp + fpl) * O;
        grow = gx.Wp * O;
      } else if (gx.padded()) {
        float* dst = sc.at(s_rows, worker);
        for (int64_t i = 0; i < gf.Ho; ++i)
          std::memcpy(dst + i * gf.Wo * O, g + ((i + fpt) * gx.Wp + fpl) * O,
                      sizeof(float) * gf.Wo * O);
        g = dst;
      }
      const float* xin = prepared_image(gf, xs + b * x_img, nullptr, nullptr,
                                        sc.at(s_x, worker));
      dw_plan.image(xin, g, part_g, bias ? dw_plan.db_part_of(group) : nullptr,
                    sc.at(s_dw, worker), grow);
    }
  };
  parallel_for(pool, dw_plan.groups, workers, body);
  dw_plan.finish(dw->typed_data(), db->typed_data(), O);
  return ffi::Error::Success();
}

// ------------------------------------------------ a conv and relu, then a 1x1 conv and relu
// cnn_conv_pw:       y = relu(a @ w2 + b2), a = relu(conv(x, w) + b) (M channels), image by
//                    image: the 1x1 conv reads a where it was just made, in cache. a is an
//                    output too, for the backward pass.
// cnn_conv_pw_grads: from y's gradient gy, image by image, in per-thread scratch: g2 = gy where
//                    y > 0, then da = g2 @ w2^T where a > 0; from them either the kernel and
//                    bias gradients (dw, db, dw2, db2, grouped as cnn_conv_dw groups them) or,
//                    with input_grad, x's gradient (cnn_conv of da with the flipped kernel): two
//                    calls, so that XLA drops the second where x needs no gradient. Neither g2
//                    nor da is written to memory.
// M is 8, 16, 24 or 32. The same values as cnn_conv and cnn_conv_dw taking the two layers one
// after another.
// The geometries of the k x k conv (x: B, H, W, C; w: KH, KW, C, M) and of the 1x1 (M -> N),
// checked against y (B, Ho, Wo, N).
ffi::Error pw_geometry(const std::string& name, ffi::Span<const int64_t> xd,
                       ffi::Span<const int64_t> wd, int64_t M, int64_t N,
                       ffi::Span<const int64_t> yd, int64_t pt, int64_t pb, int64_t pl,
                       int64_t pr, Geometry& g1, Geometry& g2) {
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || wd[2] != xd[3] || wd[3] != M)
    return ffi::Error::InvalidArgument(name + ": expects NHWC x and y, and HWIO kernels");
  if (xd[3] > 32 || !whole_vectors(M) || N < 1 || N > 32 ||
      std::min({pt, pb, pl, pr}) < 0 || pt >= wd[0] || pb >= wd[0] || pl >= wd[1] ||
      pr >= wd[1])
    return ffi::Error::InvalidArgument(
        name + ": expects at most 32 channels in x and y, 8, 16, 24 or 32 in a, and pads of at"
               " most k - 1");
  g1 = Geometry{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], M, xd[1] + pt + pb - wd[0] + 1,
                xd[2] + pl + pr - wd[1] + 1, pt, pl, xd[1] + pt + pb, xd[2] + pl + pr};
  if (g1.Ho < 1 || g1.Wo < 1 || yd[0] != g1.B || yd[1] != g1.Ho || yd[2] != g1.Wo || yd[3] != N)
    return ffi::Error::InvalidArgument(name + ": y's shape does not match the geometry");
  g2 = Geometry{g1.B, g1.Ho, g1.Wo, M, 1, 1, N, g1.Ho, g1.Wo, 0, 0, g1.Ho, g1.Wo};
  return ffi::Error::Success();
}

ffi::Error ConvPwImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> w2,
                      ffi::Buffer<ffi::F32> b2, ffi::ResultBuffer<ffi::F32> y,
                      ffi::ResultBuffer<ffi::F32> a, int64_t pt, int64_t pb, int64_t pl,
                      int64_t pr) {
  auto wd = w.dimensions(), w2d = w2.dimensions();
  if (wd.size() != 4 || w2d.size() != 4 || w2d[0] != 1 || w2d[1] != 1 || w2d[2] != wd[3] ||
      int64_t(b.element_count()) != wd[3] || int64_t(b2.element_count()) != w2d[3])
    return ffi::Error::InvalidArgument(
        "cnn_conv_pw: expects w (KH, KW, C, M), b (M,), w2 (1, 1, M, N) and b2 (N,)");
  Geometry g1, g2;
  if (auto e = pw_geometry("cnn_conv_pw", x.dimensions(), wd, wd[3], w2d[3], y->dimensions(), pt,
                           pb, pl, pr, g1, g2);
      e.failure())
    return e;
  const int64_t a_img = g1.Ho * g1.Wo * g1.O, y_img = g1.Ho * g1.Wo * g2.O;
  if (int64_t(a->element_count()) != g1.B * a_img)
    return ffi::Error::InvalidArgument("cnn_conv_pw: expects a shaped (B, Ho, Wo, M)");
  const ConvPlan p1(g1, w.typed_data(), b.typed_data()), p2(g2, w2.typed_data(), b2.typed_data());
  const int64_t workers = workers_of(pool), x_img = g1.H * g1.W * g1.C;
  Scratch sc(workers);
  const int64_t s_x = sc.add(g1.padded() ? g1.padded_image_size() : 0);
  const int64_t s_w1 = sc.add(p1.work_size()), s_w2 = sc.add(p2.work_size());
  sc.allocate();
  const float* xs = x.typed_data();
  float *ys = y->typed_data(), *as = a->typed_data();
  auto body = [&](int64_t i, int64_t worker) {
    const float* xin = prepared_image(g1, xs + i * x_img, nullptr, nullptr, sc.at(s_x, worker));
    p1.image(nullptr, true, xin, as + i * a_img, sc.at(s_w1, worker));
    p2.image(nullptr, true, as + i * a_img, ys + i * y_img, sc.at(s_w2, worker));
  };
  parallel_for(pool, g1.B, workers, body);
  return ffi::Error::Success();
}

ffi::Error ConvPwGradsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> wf, ffi::Buffer<ffi::F32> w2t,
                           ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> a,
                           ffi::Buffer<ffi::F32> gy, ffi::ResultBuffer<ffi::F32> dx,
                           ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> db,
                           ffi::ResultBuffer<ffi::F32> dw2, ffi::ResultBuffer<ffi::F32> db2,
                           int64_t pt, int64_t pb, int64_t pl, int64_t pr, bool input_grad,
                           bool swap) {
  auto fd = wf.dimensions(), td = w2t.dimensions();
  if (fd.size() != 4 || td.size() != 4 || td[0] != 1 || td[1] != 1 || td[3] != fd[2])
    return ffi::Error::InvalidArgument(
        "cnn_conv_pw_grads: expects the flipped kernel (KH, KW, M, C) and w2^T (1, 1, N, M)");
  const std::vector<int64_t> wd{fd[0], fd[1], fd[3], fd[2]};  // the kernel's, HWIO
  Geometry g1, g2;
  if (auto e = pw_geometry("cnn_conv_pw_grads", x.dimensions(), wd, fd[2], td[2], y.dimensions(),
                           pt, pb, pl, pr, g1, g2);
      e.failure())
    return e;
  const int64_t C = g1.C, M = g1.O, N = g2.O, KH = g1.KH, KW = g1.KW;
  const int64_t pixels = g1.Ho * g1.Wo, a_img = pixels * M, g_img = pixels * N;
  if (!same_dims(gy.dimensions(), y.dimensions()) || int64_t(a.element_count()) != g1.B * a_img ||
      swap != (N % 8 != 0))
    return ffi::Error::InvalidArgument(
        "cnn_conv_pw_grads: expects gy shaped as y, a (B, Ho, Wo, M), and swap exactly when N is"
        " not a multiple of 8");
  const bool ok =
      input_grad
          ? same_dims(dx->dimensions(), x.dimensions()) && dw->element_count() == 0 &&
                db->element_count() == 0 && dw2->element_count() == 0 &&
                db2->element_count() == 0
          : dx->element_count() == 0 && int64_t(dw->element_count()) == KH * KW * C * M &&
                int64_t(db->element_count()) == M && int64_t(dw2->element_count()) == M * N &&
                int64_t(db2->element_count()) == N;
  if (!ok)
    return ffi::Error::InvalidArgument(
        "cnn_conv_pw_grads: with input_grad, dx shaped as x and (0,) for the rest; without it,"
        " (0,) for dx, dw and dw2 shaped as the kernels, db (M,) and db2 (N,)");
  const int64_t fpt = KH - 1 - pt, fpl = KW - 1 - pl;  // the input gradient's: full padding
  const Geometry gx{g1.B, g1.Ho, g1.Wo, M, KH, KW, C, g1.H, g1.W, fpt, fpl,
                    g1.Ho + fpt + KH - 1 - pb, g1.Wo + fpl + KW - 1 - pr};
  const Geometry gt{g1.B, g1.Ho, g1.Wo, N, 1, 1, M, g1.Ho, g1.Wo, 0, 0, g1.Ho, g1.Wo};  // da
  // the 1x1 kernel's gradient with its lanes on M (swap: x = g2, g = a; db2 = g2's sum) or on N
  const ConvPlan pt_plan(gt, w2t.typed_data(), nullptr), px(gx, wf.typed_data(), nullptr);
  DwPlan d1(g1), d2(swap ? gt : g2);
  const int64_t workers = workers_of(pool), x_img = g1.H * g1.W * C;
  Scratch sc(workers);
  const int64_t s_x = sc.add(g1.padded() && !input_grad ? g1.padded_image_size() : 0);
  const int64_t s_d = sc.add(a_img), s_g = sc.add(g_img), s_wt = sc.add(pt_plan.work_size());
  const int64_t s_dx = sc.add(input_grad ? gx.padded_image_size() : 0);
  const int64_t s_wx = sc.add(input_grad ? px.work_size() : 0);
  const int64_t s_w1 = sc.add(input_grad ? 0 : d1.work_size());
  sc.allocate();
  const float *xs = x.typed_data(), *ys = y.typed_data(), *as = a.typed_data();
  const float* gys = gy.typed_data();
  auto body = [&](int64_t group, int64_t worker) {
    for (int64_t i = d1.first(group); i < d1.end(group); ++i) {
      const float* ai = as + i * a_img;
      float *g2v = sc.at(s_g, worker), *da = sc.at(s_d, worker);
      copy_masked(g2v, gys + i * g_img, ys + i * g_img, g_img);
      pt_plan.image(nullptr, false, g2v, da, sc.at(s_wt, worker));
      copy_masked(da, da, ai, a_img);
      if (input_grad) {
        const float* din = prepared_image(gx, da, nullptr, nullptr, sc.at(s_dx, worker));
        px.image(nullptr, false, din, dx->typed_data() + i * x_img, sc.at(s_wx, worker));
        continue;
      }
      const float* xin = prepared_image(g1, xs + i * x_img, nullptr, nullptr, sc.at(s_x, worker));
      d1.image(xin, da, d1.part_of(group), d1.db_part_of(group), sc.at(s_w1, worker));
      if (swap) {
        d2.image(g2v, ai, d2.part_of(group), nullptr, nullptr);
        add_rows(d2.db_part_of(group), g2v, pixels, N);
      } else {
        d2.image(ai, g2v, d2.part_of(group), d2.db_part_of(group), nullptr);
      }
    }
  };
  parallel_for(pool, d1.groups, workers, body);
  if (!input_grad) {
    d1.finish(dw->typed_data(), db->typed_data(), M);
    d2.finish(dw2->typed_data(), db2->typed_data(), N);
  }
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------ dense
// A kernel that covers its whole input is a matmul with few outputs (O <= 32), as
// x (B, K) @ w (K, O): XLA's CPU matmuls reach ~40 GFLOP/s at O = 10. All three are
// vectorized over the contiguous side and shared among the threads by fixed chunks of K:
// cnn_dense:    y[b,o]  = sum_k x[b,k] w[k,o]  (a partial sum per chunk, added in chunk order)
// cnn_dense_dx: dx[b,k] = sum_o g[b,o] w[k,o]
// cnn_dense_dw: dw[k,o] = sum_b x[b,k] g[b,o]
constexpr int64_t kDenseChunk = 512;

template <int NV, int XB>
inline void dense_rows(const float* x, int64_t K, const float* wp, int64_t n, float* out) {
  v8 acc[XB][NV];
  for (int i = 0; i < XB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = v8{};
  for (int64_t k = 0; k < n; ++k) {
    v8 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load8(wp + (k * NV + v) * 8);
    for (int i = 0; i < XB; ++i) {
      const float s = x[i * K + k];
      for (int v = 0; v < NV; ++v) acc[i][v] += s * wv[v];
    }
  }
  for (int i = 0; i < XB; ++i)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<v8u*>(out + (i * NV + v) * 8) = acc[i][v];
}

ffi::Error DenseImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || wd[0] != xd[1] || yd[0] != xd[0] ||
      yd[1] != wd[1] || wd[1] < 1 || wd[1] > 32)
    return ffi::Error::InvalidArgument("cnn_dense: expects x (B, K), w (K, O <= 32), y (B, O)");
  const int64_t B = xd[0], K = xd[1], O = wd[1];
  with_vectors((O + 7) / 8, [&](auto nv_c) {
    constexpr int NV = decltype(nv_c)::value;
    constexpr int XB = std::max(1, std::min(12, (kRegs - NV - 2) / NV));
    const int64_t chunks = (K + kDenseChunk - 1) / kDenseChunk, workers = workers_of(pool);
    std::vector<float> part(chunks * B * NV * 8);
    std::vector<float> packed(workers * kDenseChunk * NV * 8);
    auto body = [&](int64_t c, int64_t worker) {
      const int64_t k0 = c * kDenseChunk, n = std::min(kDenseChunk, K - k0);
      float* wp = &packed[worker * kDenseChunk * NV * 8];
      pack_rows(wp, w.typed_data() + k0 * O, n, O, NV * 8);
      float* out = &part[c * B * NV * 8];
      const float* xs = x.typed_data() + k0;
      int64_t b = 0;
      for (; b + XB <= B; b += XB) dense_rows<NV, XB>(xs + b * K, K, wp, n, out + b * NV * 8);
      with_count<XB - 1>(B - b, [&](auto r) {
        dense_rows<NV, r>(xs + b * K, K, wp, n, out + b * NV * 8);
      });
    };
    parallel_for(pool, chunks, workers, body);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t o = 0; o < O; ++o) {
        float s = 0.0f;
        for (int64_t c = 0; c < chunks; ++c) s += part[(c * B + b) * NV * 8 + o];
        y->typed_data()[b * O + o] = s;
      }
  });
  return ffi::Error::Success();
}

// dx[b, k..k+8) for 8 rows b at a time: the chunk's w transposed 8 columns at a time.
ffi::Error DenseDxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> dx) {
  auto gd = g.dimensions(), wd = w.dimensions(), xd = dx->dimensions();
  if (gd.size() != 2 || wd.size() != 2 || xd.size() != 2 || gd[1] != wd[1] || xd[0] != gd[0] ||
      xd[1] != wd[0])
    return ffi::Error::InvalidArgument("cnn_dense_dx: expects g (B, O), w (K, O), dx (B, K)");
  const int64_t B = gd[0], K = wd[0], O = wd[1];
  const float* gs = g.typed_data();
  const float* ws = w.typed_data();
  float* out = dx->typed_data();
  auto body = [&](int64_t c, int64_t) {
    const int64_t k0 = c * kDenseChunk, k1 = std::min(K, k0 + kDenseChunk);
    std::vector<float> wt(O * 8);
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
      for (int64_t j = 0; j < 8; ++j)
        for (int64_t o = 0; o < O; ++o) wt[o * 8 + j] = ws[(k + j) * O + o];
      int64_t b = 0;
      for (; b + 8 <= B; b += 8) {
        v8 acc[8];
        for (int i = 0; i < 8; ++i) acc[i] = v8{};
        for (int64_t o = 0; o < O; ++o) {
          const v8 wv = load8(&wt[o * 8]);
          for (int i = 0; i < 8; ++i) acc[i] += gs[(b + i) * O + o] * wv;
        }
        for (int i = 0; i < 8; ++i) *reinterpret_cast<v8u*>(out + (b + i) * K + k) = acc[i];
      }
      for (; b < B; ++b) {
        v8 acc = v8{};
        for (int64_t o = 0; o < O; ++o) acc += gs[b * O + o] * load8(&wt[o * 8]);
        *reinterpret_cast<v8u*>(out + b * K + k) = acc;
      }
    }
    for (; k < k1; ++k)
      for (int64_t b = 0; b < B; ++b) {
        float s = 0.0f;
        for (int64_t o = 0; o < O; ++o) s += gs[b * O + o] * ws[k * O + o];
        out[b * K + k] = s;
      }
  };
  parallel_for(pool, (K + kDenseChunk - 1) / kDenseChunk, workers_of(pool), body);
  return ffi::Error::Success();
}

// dw[k..k+TB, :] for TB columns of x at a time, over all rows b.
template <int NV, int TB>
inline void dense_dw_block(const float* x, int64_t B, int64_t K, const float* gp, int64_t O,
                           float* dw) {
  v8 acc[TB][NV];
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < NV; ++v) acc[t][v] = v8{};
  for (int64_t b = 0; b < B; ++b) {
    v8 gv[NV];
    for (int v = 0; v < NV; ++v) gv[v] = load8(gp + (b * NV + v) * 8);
    for (int t = 0; t < TB; ++t) {
      const float s = x[b * K + t];
      for (int v = 0; v < NV; ++v) acc[t][v] += s * gv[v];
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < NV; ++v)
      for (int64_t o = v * 8; o < std::min<int64_t>(O, v * 8 + 8); ++o)
        dw[t * O + o] = acc[t][v][o - v * 8];
}

ffi::Error DenseDwImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                       ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  if (xd.size() != 2 || gd.size() != 2 || wd.size() != 2 || gd[0] != xd[0] || wd[0] != xd[1] ||
      wd[1] != gd[1] || gd[1] < 1 || gd[1] > 32)
    return ffi::Error::InvalidArgument("cnn_dense_dw: expects x (B, K), g (B, O <= 32), dw (K, O)");
  const int64_t B = xd[0], K = xd[1], O = gd[1];
  with_vectors((O + 7) / 8, [&](auto nv_c) {
    constexpr int NV = decltype(nv_c)::value;
    constexpr int TB = std::max(1, std::min(12, (kRegs - NV - 2) / NV));
    std::vector<float> gp(B * NV * 8);  // g's rows in whole vectors
    pack_rows(gp.data(), g.typed_data(), B, O, NV * 8);
    auto body = [&](int64_t c, int64_t) {
      const int64_t k0 = c * kDenseChunk, k1 = std::min(K, k0 + kDenseChunk);
      const float* xs = x.typed_data();
      float* out = dw->typed_data();
      int64_t k = k0;
      for (; k + TB <= k1; k += TB) dense_dw_block<NV, TB>(xs + k, B, K, gp.data(), O, out + k * O);
      with_count<TB - 1>(k1 - k, [&](auto r) {
        dense_dw_block<NV, r>(xs + k, B, K, gp.data(), O, out + k * O);
      });
    };
    parallel_for(pool, (K + kDenseChunk - 1) / kDenseChunk, workers_of(pool), body);
  });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------ Adam
// cnn_adam: optax.scale_by_adam's arithmetic on one float32 array, in one pass over memory:
//   mu' = fma(c1, g, b1 * mu);  nu' = fma(c2, g * g, b2 * nu);
//   u = (mu' * (1 / bc[0])) / (sqrt(nu' * (1 / bc[1])) + eps)
// c1 = 1 - b1 and c2 = 1 - b2 are rounded to float by the caller, as JAX rounds optax's Python
// scalars; bc holds the two bias corrections (1 - b^count), computed by the caller as optax
// does; optax's eps_root is 0. The multiply-adds and reciprocals are those XLA's CPU compiler
// chose for optax's expressions in a small program; in a large one it may round otherwise, so
// the last bit can differ from optax's there.
constexpr int64_t kAdamChunk = 16384;

// Scalar: the tail, and CPUs without AVX and FMA.
inline void adam_one(const float* g, const float* mu, const float* nu, float r1, float r2,
                     float b1, float b2, float c1, float c2, float eps, float* u, float* mu_o,
                     float* nu_o, int64_t i) {
  const float gi = g[i];
  const float m = std::fma(c1, gi, b1 * mu[i]);
  const float v = std::fma(c2, gi * gi, b2 * nu[i]);
  mu_o[i] = m;
  nu_o[i] = v;
  u[i] = (m * r1) / (std::sqrt(v * r2) + eps);
}

void adam_chunk(const float* g, const float* mu, const float* nu, float r1, float r2, float b1,
                float b2, float c1, float c2, float eps, float* u, float* mu_o, float* nu_o,
                int64_t n) {
  int64_t i = 0;
#if defined(__AVX__) && defined(__FMA__)
  const __m256 vr1 = _mm256_set1_ps(r1), vr2 = _mm256_set1_ps(r2), vb1 = _mm256_set1_ps(b1),
               vb2 = _mm256_set1_ps(b2), vc1 = _mm256_set1_ps(c1), vc2 = _mm256_set1_ps(c2),
               veps = _mm256_set1_ps(eps);
  for (; i + 8 <= n; i += 8) {
    const __m256 gi = _mm256_loadu_ps(g + i);
    const __m256 m = _mm256_fmadd_ps(vc1, gi, _mm256_mul_ps(vb1, _mm256_loadu_ps(mu + i)));
    const __m256 v = _mm256_fmadd_ps(vc2, _mm256_mul_ps(gi, gi),
                                     _mm256_mul_ps(vb2, _mm256_loadu_ps(nu + i)));
    _mm256_storeu_ps(mu_o + i, m);
    _mm256_storeu_ps(nu_o + i, v);
    const __m256 den = _mm256_add_ps(_mm256_sqrt_ps(_mm256_mul_ps(v, vr2)), veps);
    _mm256_storeu_ps(u + i, _mm256_div_ps(_mm256_mul_ps(m, vr1), den));
  }
#endif
  for (; i < n; ++i) adam_one(g, mu, nu, r1, r2, b1, b2, c1, c2, eps, u, mu_o, nu_o, i);
}

ffi::Error AdamImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> mu,
                    ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::F32> bc,
                    ffi::ResultBuffer<ffi::F32> u, ffi::ResultBuffer<ffi::F32> mu_o,
                    ffi::ResultBuffer<ffi::F32> nu_o, float b1, float b2, float c1, float c2,
                    float eps) {
  const int64_t n = g.element_count();
  if (int64_t(mu.element_count()) != n || int64_t(nu.element_count()) != n ||
      int64_t(u->element_count()) != n || bc.element_count() != 2)
    return ffi::Error::InvalidArgument("cnn_adam: expects g, mu, nu of one size and bc (2,)");
  const float r1 = 1.0f / bc.typed_data()[0], r2 = 1.0f / bc.typed_data()[1];
  auto body = [&](int64_t chunk, int64_t) {
    const int64_t lo = chunk * kAdamChunk, len = std::min(kAdamChunk, n - lo);
    adam_chunk(g.typed_data() + lo, mu.typed_data() + lo, nu.typed_data() + lo, r1, r2, b1, b2,
               c1, c2, eps, u->typed_data() + lo, mu_o->typed_data() + lo, nu_o->typed_data() + lo,
               len);
  };
  parallel_for(pool, (n + kAdamChunk - 1) / kAdamChunk, workers_of(pool), body);
  return ffi::Error::Success();
}


// ------------------------------------------------------------------------------------ warp
// cnn_warp: each image rotated and shifted (cnn/augment.py's affine_warp), sampled bilinearly:
//   v = (i - cy) - sy;  u = (j - cx) - sx;  (cy, cx) = ((H - 1) / 2, (W - 1) / 2)
//   dy = ((sin u + cos v) + cy) - i;  dx = ((cos u - sin v) + cx) - j
//   w(d, o) = max(1 - |d - o|, 0);  a = floor(d), b = a + 1 (the two offsets w is not 0 at)
//   row(o) = w(dx, ax) x[i + o, j + ax] + w(dx, bx) x[i + o, j + bx]
//   out[b, i, j] = w(dy, ay) row(ay) + w(dy, by) row(by)
// with x = fill outside the image: the sum over shifted copies that XLA runs for small warps
// (augment._bilinear_window_BHWC, offsets -window..window), whose other terms have weight 0,
// written without them, and rounded as XLA's CPU compiler was measured to round it for one
// channel at 28x28 (jax 0.10, on Zen 4 and Sapphire Rapids; other widths and CPUs may contract
// otherwise, within 1e-5: tests/test_augment.py): LLVM turns
// each product added to another into a multiply-add, the first operand's product taken in it.
// So dy's sum is fma(sin, u, cos v), dx's fma(cos, u, -(sin v)), and each two-term sum
// fma(w_b, x_b, w_a x_a), or fma(w_a, x_a, w_b x_b) where a is the first offset (-window: its
// product is the first operand; the zero terms before it add nothing). window = 0 (warps
// beyond the window's reach) takes the second form throughout. cos and sin come from the
// caller, which computes them as XLA does. A NaN angle or shift gives NaN, as XLA's max does.
struct WarpRow {
  float wya, wyb, wxa, wxb;
  int32_t at;            // the a corner's index in the image padded by 2 on each side
  bool first_y, first_x;  // a is the first offset
};

// w_a x_a + w_b x_b, as XLA rounds it (above).
inline float warp_sum(float wa, float xa, float wb, float xb, bool first) {
  return first ? std::fma(wa, xa, wb * xb) : std::fma(wb, xb, wa * xa);
}

__attribute__((optimize("fp-contract=off"))) inline float warp_weight(float d, float o) {
  const float w = 1.0f - std::fabs(d - o);
  return w < 0.0f ? 0.0f : w;
}

// Row or column of the a corner, clamped to [-2, n] (a NaN to -2): beyond, both corners are
// in the fill border.
inline int32_t warp_corner(float r, int64_t n) {
  r = r > -2.0f ? r : -2.0f;
  r = r < float(n) ? r : float(n);
  return int32_t(r);
}

#if defined(__AVX2__) && defined(__FMA__)
// One row of a one-channel image, 8 columns at a time: warp_image's arithmetic, vectorized.
__attribute__((optimize("fp-contract=off"))) void warp_row_c1(const float* padded, int64_t H,
                                                               int64_t W, float fi, float cs,
                                                               float sn, float sy, float sx,
                                                               float first, float* out) {
  const float cy = float(H - 1) * 0.5f, cx = float(W - 1) * 0.5f, v = (fi - cy) - sy;
  const int32_t Wp = int32_t(W + 4);
  const __m256 vcs = _mm256_set1_ps(cs), vsn = _mm256_set1_ps(sn),
               vcv = _mm256_set1_ps(cs * v), vnsv = _mm256_set1_ps(-(sn * v)),
               vcx = _mm256_set1_ps(cx), vcy = _mm256_set1_ps(cy), vsx = _mm256_set1_ps(sx),
               vfi = _mm256_set1_ps(fi), one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(),
               vfirst = _mm256_set1_ps(first), lo = _mm256_set1_ps(-2.0f),
               hy = _mm256_set1_ps(float(H)), hx = _mm256_set1_ps(float(W)),
               two = _mm256_set1_ps(2.0f), lanes = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7),
               sign = _mm256_set1_ps(-0.0f);
  const __m256i vWp = _mm256_set1_epi32(Wp), i1 = _mm256_set1_epi32(1);
  auto weight = [&](__m256 d, __m256 o) {  // max(1 - |d - o|, 0), NaN kept
    const __m256 w = _mm256_sub_ps(one, _mm256_andnot_ps(sign, _mm256_sub_ps(d, o)));
    return _mm256_blendv_ps(w, zero, _mm256_cmp_ps(w, zero, _CMP_LT_OQ));
  };
  auto corner = [&](__m256 r, __m256 n) {  // clamped to [-2, n] (NaN: -2), plus the border
    return _mm256_cvttps_epi32(_mm256_add_ps(_mm256_min_ps(_mm256_max_ps(r, lo), n), two));
  };
  auto sum = [](__m256 wa, __m256 xa, __m256 wb, __m256 xb, __m256 first_a) {
    return _mm256_blendv_ps(_mm256_fmadd_ps(wb, xb, _mm256_mul_ps(wa, xa)),
                            _mm256_fmadd_ps(wa, xa, _mm256_mul_ps(wb, xb)), first_a);
  };
  for (int64_t j0 = 0; j0 < W; j0 += 8) {
    const __m256 fj = _mm256_add_ps(_mm256_set1_ps(float(j0)), lanes);
    const __m256 u = _mm256_sub_ps(_mm256_sub_ps(fj, vcx), vsx);
    const __m256 dy = _mm256_sub_ps(_mm256_add_ps(_mm256_fmadd_ps(vsn, u, vcv), vcy), vfi);
    const __m256 dx = _mm256_sub_ps(_mm256_add_ps(_mm256_fmadd_ps(vcs, u, vnsv), vcx), fj);
    const __m256 ay = _mm256_floor_ps(dy), ax = _mm256_floor_ps(dx);
    const __m256 wya = weight(dy, ay), wyb = weight(dy, _mm256_add_ps(ay, one));
    const __m256 wxa = weight(dx, ax), wxb = weight(dx, _mm256_add_ps(ax, one));
    const __m256i at = _mm256_add_epi32(
        _mm256_mullo_epi32(corner(_mm256_add_ps(ay, vfi), hy), vWp),
        corner(_mm256_add_ps(ax, fj), hx));
    const __m256 x00 = _mm256_i32gather_ps(padded, at, 4);
    const __m256 x01 = _mm256_i32gather_ps(padded, _mm256_add_epi32(at, i1), 4);
    const __m256i at1 = _mm256_add_epi32(at, vWp);
    const __m256 x10 = _mm256_i32gather_ps(padded, at1, 4);
    const __m256 x11 = _mm256_i32gather_ps(padded, _mm256_add_epi32(at1, i1), 4);
    const __m256 fx = _mm256_cmp_ps(ax, vfirst, _CMP_EQ_OQ);
    const __m256 fy = _mm256_cmp_ps(ay, vfirst, _CMP_EQ_OQ);
    const __m256 r = sum(wya, sum(wxa, x00, wxb, x01, fx), wyb, sum(wxa, x10, wxb, x11, fx), fy);
    if (j0 + 8 <= W) {
      _mm256_storeu_ps(out + j0, r);
    } else {
      alignas(32) float tail[8];
      _mm256_store_ps(tail, r);
      std::memcpy(out + j0, tail, sizeof(float) * (W - j0));
    }
  }
}
#endif

__attribute__((optimize("fp-contract=off"))) void warp_image(const float* x, int64_t H,
                                                              int64_t W, int64_t C, float cs,
                                                              float sn, float sy, float sx,
                                                              float fill, int64_t window,
                                                              float* out, float* padded,
                                                              WarpRow* row) {
  const int64_t Wp = W + 4;
  std::fill(padded, padded + (H + 4) * Wp * C, fill);
  for (int64_t i = 0; i < H; ++i)
    std::memcpy(padded + ((i + 2) * Wp + 2) * C, x + i * W * C, sizeof(float) * W * C);
  const float first = window ? -float(window) : -INFINITY;
#if defined(__AVX2__) && defined(__FMA__)
  if (C == 1 && (H + 4) * Wp < (int64_t(1) << 31)) {
    for (int64_t i = 0; i < H; ++i)
      warp_row_c1(padded, H, W, float(i), cs, sn, sy, sx, first, out + i * W);
    return;
  }
#endif
  const float cy = float(H - 1) * 0.5f, cx = float(W - 1) * 0.5f;
  for (int64_t i = 0; i < H; ++i) {
    const float fi = float(i), v = (fi - cy) - sy;
    const float cv = cs * v, sv = sn * v;
    for (int64_t j = 0; j < W; ++j) {
      const float fj = float(j), u = (fj - cx) - sx;
      const float dy = (std::fma(sn, u, cv) + cy) - fi;
      const float dx = (std::fma(cs, u, -sv) + cx) - fj;
      const float ay = std::floor(dy), ax = std::floor(dx);
      row[j].wya = warp_weight(dy, ay);
      row[j].wyb = warp_weight(dy, ay + 1.0f);
      row[j].wxa = warp_weight(dx, ax);
      row[j].wxb = warp_weight(dx, ax + 1.0f);
      row[j].first_y = ay == first;
      row[j].first_x = ax == first;
      row[j].at = int32_t((warp_corner(ay + fi, H) + 2) * Wp + warp_corner(ax + fj, W) + 2);
    }
    float* o = out + i * W * C;
    for (int64_t j = 0; j < W; ++j) {
      const WarpRow& r = row[j];
      const float* p = padded + int64_t(r.at) * C;
      for (int64_t c = 0; c < C; ++c) {
        const float row_a = warp_sum(r.wxa, p[c], r.wxb, p[C + c], r.first_x);
        const float row_b = warp_sum(r.wxa, p[Wp * C + c], r.wxb, p[(Wp + 1) * C + c], r.first_x);
        o[j * C + c] = warp_sum(r.wya, row_a, r.wyb, row_b, r.first_y);
      }
    }
  }
}

ffi::Error WarpImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> cs,
                    ffi::Buffer<ffi::F32> shift, ffi::Buffer<ffi::F32> fill,
                    ffi::ResultBuffer<ffi::F32> out, int64_t window) {
  const auto d = x.dimensions();
  if (d.size() != 4 || cs.dimensions().size() != 2 || shift.dimensions().size() != 2 ||
      cs.dimensions()[0] != d[0] || cs.dimensions()[1] != 2 || shift.dimensions()[0] != d[0] ||
      shift.dimensions()[1] != 2 || fill.element_count() != 1 ||
      out->element_count() != x.element_count())
    return ffi::Error::InvalidArgument(
        "cnn_warp: expects x (B, H, W, C), cos and sin (B, 2), shift (B, 2), fill (1,)");
  if (window < 0) return ffi::Error::InvalidArgument("cnn_warp: window must be >= 0");
  const int64_t B = d[0], H = d[1], W = d[2], C = d[3], n = H * W * C;
  const float f = fill.typed_data()[0];
  const float* c2 = cs.typed_data();
  const float* s2 = shift.typed_data();
  const int64_t workers = workers_of(pool);
  Scratch sc(workers);
  const int64_t s_pad = sc.add((H + 4) * (W + 4) * C),
                s_row = sc.add((W * sizeof(WarpRow) + sizeof(float) - 1) / sizeof(float));
  sc.allocate();
  auto body = [&](int64_t b, int64_t worker) {
    warp_image(x.typed_data() + b * n, H, W, C, c2[2 * b], c2[2 * b + 1], s2[2 * b],
               s2[2 * b + 1], f, window, out->typed_data() + b * n, sc.at(s_pad, worker),
               reinterpret_cast<WarpRow*>(sc.at(s_row, worker)));
  };
  parallel_for(pool, B, workers, body);
  return ffi::Error::Success();
}

}  // namespace

namespace {

// The handlers' bindings, read off each implementation's signature (bind_params): the thread
// pool, then its operands (ffi::Buffer) and results (ffi::ResultBuffer) in order, then its
// attributes, whose names the handler gives in order.
template <class T>
struct IsBuffer : std::false_type {};
template <ffi::DataType D, size_t R>
struct IsBuffer<ffi::Buffer<D, R>> : std::true_type {};
template <class T>
struct IsResult : std::false_type {};
template <class T>
struct IsResult<ffi::Result<T>> : std::true_type {
  using Inner = T;
};
template <class T>
constexpr bool kIsAttr =
    !std::is_same_v<T, ffi::ThreadPool> && !IsBuffer<T>::value && !IsResult<T>::value;

// binding with P added (the thread pool as the context, an operand, a result, or the attribute
// named *names). Bindings cannot be copied or moved: each step returns a new one, held by
// reference (a temporary's lifetime extended) until the next.
template <class P, class B>
auto add_param(B& binding, const char* const* names) {
  if constexpr (std::is_same_v<P, ffi::ThreadPool>)
    return std::move(binding).template Ctx<ffi::ThreadPool>();
  else if constexpr (IsBuffer<P>::value)
    return std::move(binding).template Arg<P>();
  else if constexpr (IsResult<P>::value)
    return std::move(binding).template Ret<typename IsResult<P>::Inner>();
  else
    return std::move(binding).template Attr<P>(*names);
}

template <class B, class P, class... Ps>
auto bind_params(B& binding, const char* const* names, std::tuple<P, Ps...>*) {
  if constexpr (sizeof...(Ps) == 0) {
    return add_param<P>(binding, names);
  } else {
    auto&& next = add_param<P>(binding, names);
    return bind_params(next, names + kIsAttr<P>, static_cast<std::tuple<Ps...>*>(nullptr));
  }
}

// impl's binding; `names` names its attributes, one each, in order.
template <class... Ps, class... Names>
auto binding_of(ffi::Error (*)(Ps...), Names... names) {
  static_assert((int(kIsAttr<Ps>) + ... + 0) == sizeof...(Names), "one name per attribute");
  const char* const list[] = {names..., nullptr};
  auto&& start = ffi::Ffi::Bind();
  return bind_params(start, list, static_cast<std::tuple<Ps...>*>(nullptr));
}

}  // namespace

#define CNN_PADS "pad_top", "pad_bottom", "pad_left", "pad_right"

// x, w, bias, mask source, terms -> y, per-image sums of y and y^2 (B, 2, O; with stats)
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConv, ConvImpl,
                              binding_of(ConvImpl, CNN_PADS, "relu", "mask", "stats", "terms"));
// x, g, mask source, terms -> dw, db (zeros unless bias)
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConvDw, ConvDwImpl,
                              binding_of(ConvDwImpl, CNN_PADS, "mask", "bias", "swap", "terms"));
// a, inv, shift -> pooled, place of each window's maximum, a at that place
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnBnPool, BnPoolImpl, binding_of(BnPoolImpl, "kh", "kw"));
// pooled gradient, a at the places, mean -> per-image sums (B, 2, C)
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnBnPoolSums, BnPoolSumsImpl, binding_of(BnPoolSumsImpl));
// pooled gradient, places, a, inv, c1, c2, row weights -> the gradient in a
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnBnPoolGrad, BnPoolGradImpl,
                              binding_of(BnPoolGradImpl, "kh", "kw"));
// x, flipped kernel, a, pooled gradient, places, inv, c1, c2, row weights -> dx, dw, db (zeros
// unless bias)
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConvPoolGrads, ConvPoolGradsImpl,
                              binding_of(ConvPoolGradsImpl, CNN_PADS, "kh", "kw", "bias"));
// x, w, b, w2, b2 -> y = relu(a @ w2 + b2), a = relu(conv(x, w) + b)
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConvPw, ConvPwImpl, binding_of(ConvPwImpl, CNN_PADS));
// x, flipped kernel, w2^T, y, a, y's gradient -> dx (input_grad), or dw, db, dw2 (transposed
// with swap), db2
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConvPwGrads, ConvPwGradsImpl,
                              binding_of(ConvPwGradsImpl, CNN_PADS, "input_grad", "swap"));
// g, mu, nu, bias corrections -> update, mu, nu
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnAdam, AdamImpl,
                              binding_of(AdamImpl, "b1", "b2", "c1", "c2", "eps"));
// x (B, K), w (K, O) -> y (B, O)
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnDense, DenseImpl, binding_of(DenseImpl));
// g (B, O), w (K, O) -> dx (B, K)
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnDenseDx, DenseDxImpl, binding_of(DenseDxImpl));
// x (B, K), g (B, O) -> dw (K, O)
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnDenseDw, DenseDwImpl, binding_of(DenseDwImpl));
// x (B, H, W, C), cos and sin (B, 2), shift (B, 2), fill (1,) -> the warped x
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnWarp, WarpImpl, binding_of(WarpImpl, "window"));
