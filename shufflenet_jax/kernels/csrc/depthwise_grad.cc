// The depthwise 3x3 convolution's weight gradient, where XLA materializes nine shifted windows
// and reduces each:
//     dk[i, j, c] = sum_{n, h, w} x[n, s*h + i - 1, s*w + j - 1, c] * g[n, h, w, c]

#include "common.h"

namespace {

// f(c, V{}) for vectors V covering channels [0, n) of unpadded rows: whole vectors, the last
// one overlapping the one before where n is not a multiple (lanes of the same channel compute
// the same sums); half vectors, or single floats, where n is narrower than a vector.
template <typename F>
void OverlappingVectors(int64_t n, F&& f) {
  auto run = [&](auto lanes) {
    using V = decltype(lanes);
    constexpr int64_t width = kLanesOf<V>;
    int64_t c = 0;
    for (; c + width <= n; c += width) f(c, V{});
    if (c < n) f(n - width, V{});
  };
  if (n >= kLanes) {
    run(Vec{});
  } else if (n >= kHalfLanes) {
    run(Half{});
  } else {
    run(float{});
  }
}

// Per output row and kernel row, a vector of channels at a time: the three taps' sums over
// the row stay in registers (in memory, a load and a store per multiply-add, it was slower).
void DepthwiseGradImages(const float* __restrict x, const float* __restrict g, const Geometry& s,
                         int64_t n0, int64_t n1, double* __restrict acc) {
  const int64_t c = s.cin, st = s.stride;
  // tap j = 0 reads column st*w - 1, inside from w = 1; tap 2 reads st*w + 1, inside below
  const int64_t right_end = s.w < 2 ? 0 : std::min(s.wo, (s.w - 2) / st + 1);
  std::vector<float> row_sum(9 * c);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t h = 0; h < s.ho; ++h) {
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      const float* __restrict grow = g + ((n * s.ho + h) * s.wo) * c;
      // The vector passes below read a row's pixels strided: the next output row's input rows
      // are prefetched in order, as a channel-inner loop would read them (the stride-2
      // gradients of 58 channels read from memory were as slow as channel-inner without it).
      const int64_t next0 = std::max<int64_t>(0, st * (h + 1) - 1);
      for (int64_t hi = next0; hi < std::min(s.h, st * (h + 1) + 2); ++hi) {
        const char* row = reinterpret_cast<const char*>(x + ((n * s.h + hi) * s.w) * c);
        for (int64_t b = 0; b < s.w * c * 4; b += 64) __builtin_prefetch(row + b);
      }
      for (int64_t i = 0; i < 3; ++i) {
        const int64_t hi = st * h + i - 1;
        if (hi < 0 || hi >= s.h) continue;
        const float* __restrict xrow = x + ((n * s.h + hi) * s.w) * c;
        OverlappingVectors(c, [&](int64_t c0, auto lanes) {
          using V = decltype(lanes);
          V left{}, mid{}, right{};  // taps j = 0, 1, 2
          auto at = [&](int64_t w, int64_t j) { return Load<V>(xrow + (st * w + j - 1) * c + c0); };
          for (int64_t w = 0; w < s.wo; ++w) {  // in order of w for each tap, as tap by tap
            const V gv = Load<V>(grow + w * c + c0);
            if (w > 0) left += at(w, 0) * gv;
            mid += at(w, 1) * gv;
            if (w < right_end) right += at(w, 2) * gv;
          }
          Store(row_sum.data() + (3 * i) * c + c0, left);
          Store(row_sum.data() + (3 * i + 1) * c + c0, mid);
          Store(row_sum.data() + (3 * i + 2) * c + c0, right);
        });
      }
      for (int64_t k = 0; k < 9 * c; ++k) acc[k] += row_sum[k];
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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShufflenetDepthwiseKernelGrad, DepthwiseKernelGrad,
                              KernelGradBinding());
