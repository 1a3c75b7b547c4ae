// The weight gradient of a dense convolution with few input channels and at most 64 outputs
// (the 3-channel stem), where XLA writes im2col's stacked windows and multiplies them:
//     dk[i, j, c, o] = sum_{n, h, w} x[n, s*h + i - p, s*w + j - p, c] * g[n, h, w, o]

#include "common.h"

namespace {

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
template <typename F>
void ForEachTap(const Geometry& s, int64_t n, int64_t h, int64_t w, F&& f) {
  const int64_t kh = s.kh, kw = s.kw, cin = s.cin;
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

// Output channels go in NB blocks of kLanes-float vectors, the gradient padded to NB * kLanes,
// so each block is whole vector operations (run-time-length channel loops ran mostly in
// scalar remainder code).
template <int NB>
void DenseGradImages(const float* __restrict x, const float* __restrict g, const Geometry& s,
                     int64_t n0, int64_t n1, double* __restrict acc) {
  const int64_t taps = s.kh * s.kw * s.cin;
  std::vector<Vec> row_sum(taps * NB);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t h = 0; h < s.ho; ++h) {
      std::fill(row_sum.begin(), row_sum.end(), Vec{});
      for (int64_t w = 0; w < s.wo; ++w) {
        Vec gv[NB] = {};
        const float* grad = g + ((n * s.ho + h) * s.wo + w) * s.cout;
        float* lanes = reinterpret_cast<float*>(gv);
        for (int64_t o = 0; o < s.cout; ++o) lanes[o] = grad[o];
        ForEachTap(s, n, h, w, [&](int64_t row, int64_t at) {
          const float v = x[at];
          Vec* r = row_sum.data() + row * NB;
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

// The 3x3 kernel over 3 input channels (the stem), padding 1: for output row h and kernel
// row i, the taps (j, c) of output column w are the 9 consecutive values of the padded input
// row from 3 * s*w. A vector of output channels at a time sums them over the row in 9
// registers (the taps of other kernels above sum in memory, slower: a load and a store each).
void StemGradImages(const float* __restrict x, const float* __restrict g, const Geometry& s,
                    int64_t n0, int64_t n1, double* __restrict acc) {
  const int64_t cp = RoundUpPad(s.cout);
  std::vector<float> padded_grad(cp == s.cout ? 0 : s.wo * cp, 0.0f);
  std::vector<float> padded((s.w + 2) * 3, 0.0f), row_sum(27 * cp);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t h = 0; h < s.ho; ++h) {
      const float* grad = g + (n * s.ho + h) * s.wo * s.cout;
      if (cp != s.cout) {  // padded to whole vectors; the padding channels stay zero
        for (int64_t w = 0; w < s.wo; ++w) {
          std::copy(grad + w * s.cout, grad + (w + 1) * s.cout, padded_grad.data() + w * cp);
        }
        grad = padded_grad.data();
      }
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      for (int64_t i = 0; i < 3; ++i) {
        const int64_t hi = s.stride * h + i - 1;
        if (hi < 0 || hi >= s.h) continue;
        const float* xrow = x + (n * s.h + hi) * s.w * 3;
        std::copy(xrow, xrow + s.w * 3, padded.data() + 3);
        ForVectors(cp, [&](int64_t c, auto lanes) {
          using V = decltype(lanes);
          V sum[9] = {};
          for (int64_t w = 0; w < s.wo; ++w) {
            const float* xv = padded.data() + 3 * s.stride * w;
            const V gv = Load<V>(grad + w * cp + c);
            for (int q = 0; q < 9; ++q) sum[q] += Broadcast<V>(xv[q]) * gv;
          }
          for (int q = 0; q < 9; ++q) Store(row_sum.data() + (9 * i + q) * cp + c, sum[q]);
        });
      }
      for (int64_t t = 0; t < 27; ++t) {
        for (int64_t o = 0; o < s.cout; ++o) acc[t * s.cout + o] += row_sum[t * cp + o];
      }
    }
  }
}

constexpr int kMaxDenseOutputs = 64;

// f(NB) with NB == blocks as a compile-time constant, for NB * kLanes up to 64 outputs.
template <int NB, typename F>
std::optional<ffi::Error> WithBlocks(int64_t blocks, F& f) {
  if (blocks == NB) {
    f(std::integral_constant<int, NB>{});
    return std::nullopt;
  }
  if constexpr ((NB + 1) * kLanes <= kMaxDenseOutputs) return WithBlocks<NB + 1>(blocks, f);
  return ffi::Error::InvalidArgument("dense conv: 1 to 64 output channels supported");
}

ffi::Error DenseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                           ffi::ResultBuffer<ffi::F32> dk, int64_t stride) {
  Geometry s;
  if (auto error = DenseGeometry(x, dk->dimensions(), g.dimensions(), stride, &s)) return *error;
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  const int64_t size = s.kh * s.kw * s.cin * s.cout;
  std::vector<double> sums;
  auto general = [&](auto nb) {
    sums = ChunkedSums(pool, s.n, size, [&](int64_t n0, int64_t n1, double* acc) {
      DenseGradImages<decltype(nb)::value>(xp, gp, s, n0, n1, acc);
    });
  };
  if (s.cout > kMaxDenseOutputs) {
    return ffi::Error::InvalidArgument("dense conv: 1 to 64 output channels supported");
  }
  if (s.kh == 3 && s.kw == 3 && s.cin == 3) {
    sums = ChunkedSums(pool, s.n, size, [&](int64_t n0, int64_t n1, double* acc) {
      StemGradImages(xp, gp, s, n0, n1, acc);
    });
  } else if (auto error = WithBlocks<1>((s.cout + kLanes - 1) / kLanes, general)) {
    return *error;
  }
  StoreFloat(sums, dk->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShufflenetDenseKernelGrad, DenseKernelGrad, KernelGradBinding());
