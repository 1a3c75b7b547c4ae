// Hand-written CPU kernels for XLA's FFI (float32, NHWC, padding k/2 as in PyTorch), for the
// convolutions XLA:CPU compiles slowly (docs/performance.md):
//
// - depthwise 3x3 kernel gradient: XLA materializes nine shifted windows and reduces each;
//     dk[i, j, c] = sum_{n, h, w} x[n, s*h + i - 1, s*w + j - 1, c] * g[n, h, w, c]
// - kernel gradient of a dense convolution with few input channels and at most 64 outputs (the
//   3-channel stem), where XLA writes im2col's stacked windows and multiplies them:
//     dk[i, j, c, o] = sum_{n, h, w} x[n, s*h + i - p, s*w + j - p, c] * g[n, h, w, o]
// - BatchNorm's per-channel sums over N, H, W in one pass, where XLA runs one reduction each:
//     forward:  mean[c] and biased variance[c] of x
//     backward: sum[c] of g and sum[c] of g * (x - mean)
//
// Gradients are summed per output row in float32 (BatchNorm's sums per block of 128 rows of C
// channels), rows or blocks into double accumulators (one set per chunk of the batch), and the
// chunks in a fixed order: the result does not depend on threads.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(chunk) for chunk in [0, chunks) on the calling thread and helpers from XLA's
// intra-op pool. The caller claims chunks too, so it never waits for a helper that has not
// started; state is shared_ptr-owned because such a helper may start after this returns.
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, std::function<void(int64_t)> body) {
  struct State {
    std::function<void(int64_t)> body;
    int64_t chunks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void Drain() {
      for (int64_t k; (k = next.fetch_add(1)) < chunks;) {
        body(k);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>();
  state->body = std::move(body);
  state->chunks = chunks;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->Drain(); });
  state->Drain();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Splits [0, items) into chunks run in parallel; body(begin, end, acc) adds that chunk's share
// into its own `size` doubles, and the chunks' sums are added in chunk order, so the result
// does not depend on which thread ran what.
template <typename Body>
std::vector<double> ChunkedSums(ffi::ThreadPool& pool, int64_t items, int64_t size, Body&& body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(items, 4 * threads));
  const int64_t per_chunk = (items + chunks - 1) / chunks;
  std::vector<double> partial(chunks * size, 0.0);
  ParallelFor(pool, chunks, [&](int64_t k) {
    const int64_t begin = std::min(items, k * per_chunk);
    body(begin, std::min(items, begin + per_chunk), partial.data() + k * size);
  });
  std::vector<double> total(size, 0.0);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t i = 0; i < size; ++i) total[i] += partial[k * size + i];
  }
  return total;
}

void StoreFloat(const std::vector<double>& values, float* out) {
  std::transform(values.begin(), values.end(), out, [](double v) { return static_cast<float>(v); });
}

struct Geometry {
  int64_t n, h, w, cin;   // input
  int64_t ho, wo, cout;   // output
  int64_t kh, kw, stride, pad;
};

std::optional<ffi::Error> CheckGeometry(const Geometry& s) {
  if (s.stride < 1) return ffi::Error::InvalidArgument("stride must be positive");
  if (s.ho != (s.h + 2 * s.pad - s.kh) / s.stride + 1 ||
      s.wo != (s.w + 2 * s.pad - s.kw) / s.stride + 1) {
    return ffi::Error::InvalidArgument("output H, W do not match the input's");
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// Depthwise 3x3 kernel gradient.

void DepthwiseGradImages(const float* __restrict x, const float* __restrict g, const Geometry& s,
                         int64_t n0, int64_t n1, double* __restrict acc) {
  const int64_t c = s.cin;
  std::vector<float> row_sum(9 * c);
  float* __restrict rs = row_sum.data();
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t h = 0; h < s.ho; ++h) {
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      const float* __restrict grow = g + ((n * s.ho + h) * s.wo) * c;
      for (int64_t i = 0; i < 3; ++i) {
        const int64_t hi = s.stride * h + i - 1;
        if (hi < 0 || hi >= s.h) continue;
        const float* __restrict xrow = x + ((n * s.h + hi) * s.w) * c;
        for (int64_t w = 0; w < s.wo; ++w) {
          const float* __restrict gv = grow + w * c;
          for (int64_t j = 0; j < 3; ++j) {
            const int64_t wi = s.stride * w + j - 1;
            if (wi < 0 || wi >= s.w) continue;
            const float* __restrict xv = xrow + wi * c;
            float* __restrict r = rs + (i * 3 + j) * c;
            for (int64_t ch = 0; ch < c; ++ch) r[ch] += xv[ch] * gv[ch];
          }
        }
      }
      for (int64_t k = 0; k < 9 * c; ++k) acc[k] += rs[k];
    }
  }
}

ffi::Error DepthwiseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dk,
                               int64_t stride) {
  const auto xd = x.dimensions();
  const auto gd = g.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || xd[0] != gd[0] || xd[3] != gd[3]) {
    return ffi::Error::InvalidArgument("depthwise kernel grad: x and g must be NHWC, same N, C");
  }
  const Geometry s{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], 3, 3, stride, 1};
  if (auto error = CheckGeometry(s)) return *error;
  if (dk->element_count() != 9 * s.cin) {
    return ffi::Error::InvalidArgument("depthwise kernel grad: dk must hold 9 * C values");
  }
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  const auto sums = ChunkedSums(pool, s.n, 9 * s.cin, [&](int64_t n0, int64_t n1, double* acc) {
    DepthwiseGradImages(xp, gp, s, n0, n1, acc);
  });
  StoreFloat(sums, dk->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Kernel gradient of a dense convolution with few input channels.

std::optional<ffi::Error> DenseGeometry(const ffi::Buffer<ffi::F32>& x,
                                        const ffi::Span<const int64_t> kd,
                                        const ffi::Span<const int64_t> yd, int64_t stride,
                                        Geometry* s) {
  const auto xd = x.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4 || xd[0] != yd[0] || xd[3] != kd[2] ||
      kd[3] != yd[3]) {
    return ffi::Error::InvalidArgument("dense conv: x NHWC, kernel HWIO, output NHWC must agree");
  }
  *s = Geometry{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], kd[0], kd[1], stride, kd[0] / 2};
  if (kd[0] / 2 != kd[1] / 2) return ffi::Error::InvalidArgument("dense conv: kernel not square");
  return CheckGeometry(*s);
}

// The taps (i, j) of output row h and column w that fall inside the input, as offsets into x.
// KH, KW and CIN are compile-time when positive (the stem: 3, 3, 3), so loops over them unroll.
template <int KH, int KW, int CIN, typename F>
void ForEachTap(const Geometry& s, int64_t n, int64_t h, int64_t w, F&& f) {
  const int64_t kh = KH > 0 ? KH : s.kh, kw = KW > 0 ? KW : s.kw, cin = CIN > 0 ? CIN : s.cin;
  for (int64_t i = 0; i < kh; ++i) {
    const int64_t hi = s.stride * h + i - s.pad;
    if (hi < 0 || hi >= s.h) continue;
    for (int64_t j = 0; j < kw; ++j) {
      const int64_t wi = s.stride * w + j - s.pad;
      if (wi < 0 || wi >= s.w) continue;
      const int64_t offset = ((n * s.h + hi) * s.w + wi) * cin;
      for (int64_t c = 0; c < cin; ++c) f((i * kw + j) * cin + c, offset + c);
    }
  }
}

// Output channels go in NB blocks of 16-lane vectors (GCC vector extensions), the gradient
// padded to NB * 16, so each block is whole vector operations; run-time-length channel loops
// left most of the 24-channel stem in scalar remainder code, slower than XLA.
typedef float v16 __attribute__((vector_size(64)));

template <int NB, int KH, int KW, int CIN>
void DenseGradImages(const float* __restrict x, const float* __restrict g, const Geometry& s,
                     int64_t n0, int64_t n1, double* __restrict acc) {
  const int64_t taps = s.kh * s.kw * s.cin;
  std::vector<v16> row_sum(taps * NB);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t h = 0; h < s.ho; ++h) {
      std::fill(row_sum.begin(), row_sum.end(), v16{});
      for (int64_t w = 0; w < s.wo; ++w) {
        v16 gv[NB] = {};
        const float* grad = g + ((n * s.ho + h) * s.wo + w) * s.cout;
        float* lanes = reinterpret_cast<float*>(gv);
        for (int64_t o = 0; o < s.cout; ++o) lanes[o] = grad[o];
        ForEachTap<KH, KW, CIN>(s, n, h, w, [&](int64_t row, int64_t at) {
          const float v = x[at];
          v16* r = row_sum.data() + row * NB;
          for (int b = 0; b < NB; ++b) r[b] += v * gv[b];
        });
      }
      for (int64_t t = 0; t < taps; ++t) {
        const float* r = reinterpret_cast<const float*>(row_sum.data() + t * NB);
        for (int64_t o = 0; o < s.cout; ++o) acc[t * s.cout + o] += r[o];
      }
    }
  }
}

// Calls f(NB, stem) with NB = 16-lane blocks for cout (1 to 4) and stem = whether the kernel
// is 3x3 over 3 input channels (compile-time loops), both as integral constants.
template <typename F>
std::optional<ffi::Error> Dispatch(const Geometry& s, F&& f) {
  auto with_blocks = [&](auto stem) -> std::optional<ffi::Error> {
    switch ((s.cout + 15) / 16) {
      case 1: f(std::integral_constant<int, 1>{}, stem); return std::nullopt;
      case 2: f(std::integral_constant<int, 2>{}, stem); return std::nullopt;
      case 3: f(std::integral_constant<int, 3>{}, stem); return std::nullopt;
      case 4: f(std::integral_constant<int, 4>{}, stem); return std::nullopt;
    }
    return ffi::Error::InvalidArgument("dense conv: 1 to 64 output channels supported");
  };
  if (s.kh == 3 && s.kw == 3 && s.cin == 3) return with_blocks(std::true_type{});
  return with_blocks(std::false_type{});
}

ffi::Error DenseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                           ffi::ResultBuffer<ffi::F32> dk, int64_t stride) {
  Geometry s;
  if (auto error = DenseGeometry(x, dk->dimensions(), g.dimensions(), stride, &s)) return *error;
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  const int64_t size = s.kh * s.kw * s.cin * s.cout;
  std::vector<double> sums;
  auto error = Dispatch(s, [&](auto nb, auto stem) {
    constexpr int k = decltype(stem)::value ? 3 : 0;
    sums = ChunkedSums(pool, s.n, size, [&](int64_t n0, int64_t n1, double* acc) {
      DenseGradImages<decltype(nb)::value, k, k, k>(xp, gp, s, n0, n1, acc);
    });
  });
  if (error) return *error;
  StoreFloat(sums, dk->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// BatchNorm sums: x (and g) as rows of C channels; out holds two rows of C sums.

// Rows per float32 partial sum; the blocks' sums are added in double.
constexpr int64_t kRowsPerBlock = 128;

// RowFn::Add(row, s1, s2) adds one row's two terms into float sums s1[c], s2[c].
template <typename RowFn>
std::vector<double> ChannelSums(ffi::ThreadPool& pool, int64_t rows, int64_t c, const RowFn& fn) {
  return ChunkedSums(pool, rows, 2 * c, [&](int64_t r0, int64_t r1, double* acc) {
    std::vector<float> block(2 * c);
    for (int64_t b = r0; b < r1; b += kRowsPerBlock) {
      std::fill(block.begin(), block.end(), 0.0f);
      for (int64_t r = b; r < std::min(r1, b + kRowsPerBlock); ++r) {
        fn.Add(r, block.data(), block.data() + c);
      }
      for (int64_t i = 0; i < 2 * c; ++i) acc[i] += block[i];
    }
  });
}

// Sums of v and v^2 for v = x - shift, shifted by each channel's first value so that the
// variance's sum of squares does not cancel.
struct ShiftedMoments {
  const float* x;
  const float* shift;
  int64_t c;
  void Add(int64_t r, float* __restrict s1, float* __restrict s2) const {
    const float* __restrict row = x + r * c;
    const float* __restrict sh = shift;
    for (int64_t ch = 0; ch < c; ++ch) {
      const float v = row[ch] - sh[ch];
      s1[ch] += v;
      s2[ch] += v * v;
    }
  }
};

// Sums of g and g * (x - mean).
struct GradSums {
  const float* g;
  const float* x;
  const float* mean;
  int64_t c;
  void Add(int64_t r, float* __restrict s1, float* __restrict s2) const {
    const float* __restrict grow = g + r * c;
    const float* __restrict xrow = x + r * c;
    const float* __restrict m = mean;
    for (int64_t ch = 0; ch < c; ++ch) {
      s1[ch] += grow[ch];
      s2[ch] += grow[ch] * (xrow[ch] - m[ch]);
    }
  }
};

ffi::Error ChannelMoments(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto d = x.dimensions();
  const int64_t c = d.size() == 0 ? 0 : d.back();
  if (c == 0 || x.element_count() == 0 || out->element_count() != 2 * c) {
    return ffi::Error::InvalidArgument("channel moments: non-empty x (.., C), a (2, C) output");
  }
  const int64_t rows = x.element_count() / c;
  const float* xp = x.typed_data();
  const std::vector<float> shift(xp, xp + c);
  const auto sums = ChannelSums(pool, rows, c, ShiftedMoments{xp, shift.data(), c});
  float* o = out->typed_data();
  for (int64_t ch = 0; ch < c; ++ch) {
    const double m = sums[ch] / rows;
    o[ch] = static_cast<float>(shift[ch] + m);
    o[c + ch] = static_cast<float>(std::max(0.0, sums[c + ch] / rows - m * m));
  }
  return ffi::Error::Success();
}

ffi::Error BatchNormGradSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g,
                             ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean,
                             ffi::ResultBuffer<ffi::F32> out) {
  const auto d = x.dimensions();
  const int64_t c = d.size() == 0 ? 0 : d.back();
  if (g.element_count() != x.element_count() || mean.element_count() != c ||
      out->element_count() != 2 * c || c == 0) {
    return ffi::Error::InvalidArgument("batch norm grad sums: g, x (.., C), mean (C), out (2, C)");
  }
  const int64_t rows = x.element_count() / c;
  const auto sums = ChannelSums(
      pool, rows, c, GradSums{g.typed_data(), x.typed_data(), mean.typed_data(), c});
  StoreFloat(sums, out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

// Both kernel gradients take (x, g) and the stride, and return the gradient buffer.
auto KernelGradBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShufflenetDepthwiseKernelGrad, DepthwiseKernelGrad,
                              KernelGradBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ShufflenetDenseKernelGrad, DenseKernelGrad, KernelGradBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShufflenetChannelMoments, ChannelMoments,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ShufflenetBatchNormGradSums, BatchNormGradSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
