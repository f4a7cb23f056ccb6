// Direct NHWC/HWIO convolutions for small channel counts, as XLA FFI handlers on the CPU.
//
// cnn_conv:   y[b,i,j,o]  = sum_{p,q,c} xpad[b,i+p,j+q,c] * w[p,q,c,o]        (stride 1)
// cnn_conv_dw: dw[p,q,c,o] = sum_{b,i,j} xpad[b,i+p,j+q,c] * g[b,i,j,o]
// xpad is x zero-padded by (top, bottom, left, right). The input gradient of cnn_conv is
// cnn_conv of g with the flipped, transposed kernel (cnn/native.py). Output channels are held
// in 8-lane vectors (GCC vector extensions: AVX2 or AVX-512 ymm registers, NEON pairs),
// several output columns at a time; images are shared among XLA's intra-op threads.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));

#if defined(__AVX512F__)
constexpr int kRegs = 32;
#else
constexpr int kRegs = 16;
#endif

constexpr int64_t kDwGroup = 4;  // images per partial sum of the kernel gradient

inline v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }

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

// One image zero-padded into scratch (or x itself when there is no padding).
const float* padded_image(const Geometry& g, const float* x, float* scratch) {
  if (!g.padded()) return x;
  std::fill(scratch, scratch + g.padded_image_size(), 0.0f);
  for (int64_t i = 0; i < g.H; ++i) {
    std::memcpy(scratch + ((i + g.pt) * g.Wp + g.pl) * g.C, x + i * g.W * g.C,
                sizeof(float) * g.W * g.C);
  }
  return scratch;
}

// XB output columns of one output row; wp is the kernel packed as [KH*KW*C][NV*8].
template <int NV, int XB>
inline void conv_block(const Geometry& g, const float* xin, const float* wp, float* yout) {
  v8 acc[XB][NV];
  for (int i = 0; i < XB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = v8{};
  const int64_t C = g.C;
  for (int64_t p = 0; p < g.KH; ++p) {
    for (int64_t q = 0; q < g.KW; ++q) {
      const float* xr = xin + (p * g.Wp + q) * C;
      const float* wr = wp + (p * g.KW + q) * C * NV * 8;
      for (int64_t c = 0; c < C; ++c) {
        v8 wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = load8(wr + (c * NV + v) * 8);
        for (int i = 0; i < XB; ++i) {
          const float s = xr[i * C + c];
          for (int v = 0; v < NV; ++v) acc[i][v] += s * wv[v];
        }
      }
    }
  }
  const int64_t O = g.O;
  for (int i = 0; i < XB; ++i) {
    float* yo = yout + i * O;
    for (int v = 0; v < NV; ++v) {
      if ((v + 1) * 8 <= O) {
        *reinterpret_cast<v8u*>(yo + v * 8) = acc[i][v];
      } else {
        for (int64_t k = v * 8; k < O; ++k) yo[k] = acc[i][v][k - v * 8];
      }
    }
  }
}

template <int NV, int XB>
void conv_row_tail(const Geometry& g, const float* xin, const float* wp, float* yout, int r) {
  if constexpr (XB > 0) {
    if (r == XB) return conv_block<NV, XB>(g, xin, wp, yout);
    conv_row_tail<NV, XB - 1>(g, xin, wp, yout, r);
  }
}

template <int NV>
void conv_image(const Geometry& g, const float* xin, const float* wp, float* y) {
  constexpr int XB = std::max(1, std::min(12, (kRegs - NV - 2) / NV));
  for (int64_t i = 0; i < g.Ho; ++i) {
    const float* xrow = xin + i * g.Wp * g.C;
    float* yrow = y + i * g.Wo * g.O;
    int64_t j = 0;
    for (; j + XB <= g.Wo; j += XB) conv_block<NV, XB>(g, xrow + j * g.C, wp, yrow + j * g.O);
    if (j < g.Wo)
      conv_row_tail<NV, XB - 1>(g, xrow + j * g.C, wp, yrow + j * g.O, int(g.Wo - j));
  }
}

using ImageFn = void (*)(const Geometry&, const float*, const float*, float*);

template <int NV>
void conv_image_any(const Geometry& g, const float* xin, const float* wp, float* y) {
  conv_image<NV>(g, xin, wp, y);
}

ImageFn pick_conv(int64_t nv) {
  switch (nv) {
    case 1: return conv_image_any<1>;
    case 2: return conv_image_any<2>;
    case 3: return conv_image_any<3>;
    case 4: return conv_image_any<4>;
    default: return nullptr;
  }
}

// dw partial sums of one image for TB consecutive kernel taps t = (p * KW + q) * C + c, whose
// input offsets from the output pixel are off[k]: TB x NV accumulators over all output pixels,
// whatever C is (one input channel fills them with taps, many with channels).
// Contiguous: the taps are consecutive channels of one (p, q), so the offsets are off[0] + k,
// known to the compiler (fewer registers than eight loaded offsets).
template <int NV, int TB, bool Contiguous>
inline void dw_block(const Geometry& g, const float* xin, const float* gp, const int64_t* off,
                     float* out) {
  v8 acc[TB][NV];
  int64_t o[TB];
  for (int k = 0; k < TB; ++k) {
    o[k] = Contiguous ? off[0] + k : off[k];
    for (int v = 0; v < NV; ++v) acc[k][v] = v8{};
  }
  const int64_t C = g.C;
  for (int64_t i = 0; i < g.Ho; ++i) {
    const float* xr = xin + i * g.Wp * C;
    const float* gr = gp + i * g.Wo * NV * 8;
    for (int64_t j = 0; j < g.Wo; ++j) {
      v8 gv[NV];
      for (int v = 0; v < NV; ++v) gv[v] = load8(gr + (j * NV + v) * 8);
      const float* xj = xr + j * C + (Contiguous ? o[0] : 0);
      for (int k = 0; k < TB; ++k) {
        const float s = Contiguous ? xj[k] : xj[o[k]];
        for (int v = 0; v < NV; ++v) acc[k][v] += s * gv[v];
      }
    }
  }
  for (int k = 0; k < TB; ++k)
    for (int v = 0; v < NV; ++v) {
      float* dst = out + (k * NV + v) * 8;
      *reinterpret_cast<v8u*>(dst) = load8(dst) + acc[k][v];
    }
}

template <int NV, int TB>
void dw_tail(const Geometry& g, const float* xin, const float* gp, const int64_t* off,
             float* out, int r) {
  if constexpr (TB > 0) {
    if (r == TB) return dw_block<NV, TB, false>(g, xin, gp, off, out);
    dw_tail<NV, TB - 1>(g, xin, gp, off, out, r);
  }
}

template <int NV>
void dw_image(const Geometry& g, const float* xin, const float* gp, float* part) {
  constexpr int TB = std::max(1, std::min(8, (kRegs - NV - 2) / NV));
  const int64_t taps = g.KH * g.KW * g.C;
  std::vector<int64_t> off(taps);
  for (int64_t p = 0; p < g.KH; ++p)
    for (int64_t q = 0; q < g.KW; ++q)
      for (int64_t c = 0; c < g.C; ++c) off[(p * g.KW + q) * g.C + c] = (p * g.Wp + q) * g.C + c;
  int64_t t = 0;
  for (; t + TB <= taps; t += TB) {
    if (off[t + TB - 1] == off[t] + TB - 1)
      dw_block<NV, TB, true>(g, xin, gp, &off[t], part + t * NV * 8);
    else
      dw_block<NV, TB, false>(g, xin, gp, &off[t], part + t * NV * 8);
  }
  if (t < taps) dw_tail<NV, TB - 1>(g, xin, gp, &off[t], part + t * NV * 8, int(taps - t));
}

using DwFn = void (*)(const Geometry&, const float*, const float*, float*);

DwFn pick_dw(int64_t nv) {
  switch (nv) {
    case 1: return dw_image<1>;
    case 2: return dw_image<2>;
    case 3: return dw_image<3>;
    case 4: return dw_image<4>;
    default: return nullptr;
  }
}

int64_t workers_of(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y, int64_t pt, int64_t pb, int64_t pl,
                    int64_t pr) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || wd[2] != xd[3])
    return ffi::Error::InvalidArgument("cnn_conv: expects NHWC x, HWIO w, NHWC y");
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2],
             pt, pl, xd[1] + pt + pb, xd[2] + pl + pr};
  if (g.Ho != g.Hp - g.KH + 1 || g.Wo != g.Wp - g.KW + 1 || yd[0] != g.B || yd[3] != g.O)
    return ffi::Error::InvalidArgument("cnn_conv: output shape does not match the geometry");
  const int64_t nv = (g.O + 7) / 8;
  ImageFn fn = pick_conv(nv);
  if (!fn) return ffi::Error::InvalidArgument("cnn_conv: at most 32 output channels");
  std::vector<float> wp(g.KH * g.KW * g.C * nv * 8, 0.0f);
  for (int64_t t = 0; t < g.KH * g.KW * g.C; ++t)
    std::memcpy(&wp[t * nv * 8], w.typed_data() + t * g.O, sizeof(float) * g.O);
  const int64_t workers = workers_of(pool), img = g.padded_image_size();
  std::vector<float> scratch(g.padded() ? workers * img : 0);
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
  auto body = [&](int64_t b, int64_t worker) {
    const float* xin =
        padded_image(g, xs + b * g.H * g.W * g.C, g.padded() ? &scratch[worker * img] : nullptr);
    fn(g, xin, wp.data(), ys + b * g.Ho * g.Wo * g.O);
  };
  parallel_for(pool, g.B, workers, body);
  return ffi::Error::Success();
}

ffi::Error ConvDwImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gy,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t pt, int64_t pb, int64_t pl,
                      int64_t pr) {
  auto xd = x.dimensions(), gd = gy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || wd[2] != xd[3] || gd[3] != wd[3])
    return ffi::Error::InvalidArgument("cnn_conv_dw: expects NHWC x and g, HWIO dw");
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], gd[1], gd[2],
             pt, pl, xd[1] + pt + pb, xd[2] + pl + pr};
  if (g.Ho != g.Hp - g.KH + 1 || g.Wo != g.Wp - g.KW + 1 || gd[0] != g.B)
    return ffi::Error::InvalidArgument("cnn_conv_dw: gradient shape does not match the geometry");
  const int64_t nv = (g.O + 7) / 8;
  DwFn fn = pick_dw(nv);
  if (!fn) return ffi::Error::InvalidArgument("cnn_conv_dw: at most 32 output channels");
  const int64_t workers = workers_of(pool);
  const int64_t taps = g.KH * g.KW * g.C * nv * 8;
  const bool ragged = g.O % 8 != 0;
  const int64_t img = g.padded_image_size(), gimg = g.Ho * g.Wo * nv * 8;
  // Partial sums per fixed group of images, added in a fixed order: the result does not
  // depend on which thread took which group, nor on the number of threads.
  const int64_t groups = (g.B + kDwGroup - 1) / kDwGroup;
  std::vector<float> part(groups * taps, 0.0f);
  std::vector<float> scratch(g.padded() ? workers * img : 0);
  std::vector<float> gscratch(ragged ? workers * gimg : 0);
  const float* xs = x.typed_data();
  const float* gs = gy.typed_data();
  auto body = [&](int64_t group, int64_t worker) {
    for (int64_t b = group * kDwGroup; b < std::min(g.B, (group + 1) * kDwGroup); ++b) {
      const float* xin = padded_image(g, xs + b * g.H * g.W * g.C,
                                      g.padded() ? &scratch[worker * img] : nullptr);
      const float* gp = gs + b * g.Ho * g.Wo * g.O;
      if (ragged) {
        float* dst = &gscratch[worker * gimg];
        std::fill(dst, dst + gimg, 0.0f);
        for (int64_t k = 0; k < g.Ho * g.Wo; ++k)
          std::memcpy(dst + k * nv * 8, gp + k * g.O, sizeof(float) * g.O);
        gp = dst;
      }
      fn(g, xin, gp, &part[group * taps]);
    }
  };
  parallel_for(pool, groups, workers, body);
  float* out = dw->typed_data();
  for (int64_t t = 0; t < g.KH * g.KW * g.C; ++t)
    for (int64_t o = 0; o < g.O; ++o) {
      float s = 0.0f;
      for (int64_t k = 0; k < groups; ++k) s += part[k * taps + t * nv * 8 + o];
      out[t * g.O + o] = s;
    }
  return ffi::Error::Success();
}

}  // namespace

#define CNN_BIND                                                                       \
  ffi::Ffi::Bind()                                                                     \
      .Ctx<ffi::ThreadPool>()                                                          \
      .Arg<ffi::Buffer<ffi::F32>>()                                                    \
      .Arg<ffi::Buffer<ffi::F32>>()                                                    \
      .Ret<ffi::Buffer<ffi::F32>>()                                                    \
      .Attr<int64_t>("pad_top")                                                        \
      .Attr<int64_t>("pad_bottom")                                                     \
      .Attr<int64_t>("pad_left")                                                       \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConv, ConvImpl, CNN_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConvDw, ConvDwImpl, CNN_BIND);
