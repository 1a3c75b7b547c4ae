// BatchNorm's per-channel sums over N, H, W in one pass, where XLA runs one reduction each:
//     forward:  mean[c] and biased variance[c] of x
//     backward: sum[c] of g and sum[c] of g * (x - mean)

#include "common.h"

namespace {

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
