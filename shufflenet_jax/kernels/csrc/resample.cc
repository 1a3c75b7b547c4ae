// Bilinear resampling of a box of an 8-bit RGB image, antialiased as Pillow's Image.resize with
// BILINEAR and `box` (a triangle filter widened by the downscale factor), for the training
// crop on the host: Pillow's scalar passes take most of a crop's time, these vectorize.
//
// Differences from Pillow: the passes run in float32 and round once at the end (Pillow rounds
// to 8 bits after each pass), so a pixel may differ from Pillow's by one intensity level; the
// vertical pass runs first, which is the same sum.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vec.h"

namespace {

using namespace shufflenet;

// Taps of output position i in [0, out): first input index and normalized weights, at most
// `taps` each (Pillow's precompute_coeffs for a support-1 triangle filter).
struct Coefficients {
  int64_t taps = 0;
  std::vector<int64_t> first, count;
  std::vector<float> weights;  // out x taps
};

Coefficients Compute(double start, double end, int64_t in_size, int64_t out) {
  Coefficients c;
  const double scale = (end - start) / out;
  const double filter_scale = std::max(scale, 1.0);
  const double support = filter_scale;  // the triangle's support (1) times filter_scale
  c.taps = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  c.first.resize(out);
  c.count.resize(out);
  c.weights.assign(out * c.taps, 0.0f);
  for (int64_t i = 0; i < out; ++i) {
    const double center = start + (i + 0.5) * scale;
    const int64_t lo = std::max<int64_t>(0, static_cast<int64_t>(center - support + 0.5));
    const int64_t hi = std::min<int64_t>(in_size, static_cast<int64_t>(center + support + 0.5));
    auto weight = [&](int64_t x) {
      const double t = std::abs((x - center + 0.5) / filter_scale);
      return t < 1.0 ? 1.0 - t : 0.0;
    };
    double sum = 0.0;
    for (int64_t x = lo; x < hi; ++x) sum += weight(x);
    c.first[i] = lo;
    c.count[i] = std::max<int64_t>(hi - lo, 0);
    for (int64_t x = lo; x < hi; ++x) c.weights[i * c.taps + x - lo] = sum ? weight(x) / sum : 0;
  }
  return c;
}

// Rounded half up and clamped to [0, 255], as Pillow's passes round.
inline IVec Round8(Vec v) {
  v += 0.5f;
  v = v < 0.0f ? Vec{} : v;
  v = v > 255.0f ? Vec{} + 255.0f : v;
  return __builtin_convertvector(v, IVec);  // truncation: the floor, for v >= 0
}

// The horizontal taps as dense kLanes-wide columns: tile t (outputs kLanes*t ...) reads input
// pixels [lo[t], hi[t]) and weights[offset[t] + (p - lo[t]) * kLanes + lane] (zero where pixel
// p is not one of output lane's taps), so the pass is one vector multiply-add per pixel.
struct Tiles {
  std::vector<int64_t> lo, hi, offset;
  std::vector<float> weights;
};

Tiles Densify(const Coefficients& c, int64_t out) {
  Tiles t;
  for (int64_t x0 = 0; x0 < out; x0 += kLanes) {
    const int64_t x1 = std::min<int64_t>(x0 + kLanes, out);
    int64_t lo = c.first[x0], hi = lo;
    for (int64_t x = x0; x < x1; ++x) hi = std::max(hi, c.first[x] + c.count[x]);
    t.lo.push_back(lo);
    t.hi.push_back(hi);
    t.offset.push_back(t.weights.size());
    t.weights.resize(t.weights.size() + (hi - lo) * kLanes, 0.0f);
    float* w = t.weights.data() + t.offset.back();
    for (int64_t x = x0; x < x1; ++x) {
      for (int64_t k = 0; k < c.count[x]; ++k) {
        w[(c.first[x] + k - lo) * kLanes + (x - x0)] = c.weights[x * c.taps + k];
      }
    }
  }
  return t;
}


}  // namespace

// src: a window of `rows` x `cols` RGB pixels, rows `stride` bytes apart, whose first pixel is
// pixel (row0, col0) of a height x width image. Resamples the image's box [x0, x1) x [y0, y1)
// (floats, as Pillow's) to out_h x out_w, mirrored left-right when `flip`, into dst (out_h x
// out_w x 3, contiguous). Returns 0, -1 for a box outside the image or an empty size, -2 for a
// window that lacks pixels the box's filter reads.
extern "C" int ShufflenetResizeRgb(const uint8_t* src, int64_t rows, int64_t cols,
                                   int64_t stride, int64_t row0, int64_t col0, int64_t height,
                                   int64_t width, double x0, double y0, double x1, double y1,
                                   int64_t out_h, int64_t out_w, int flip, uint8_t* dst) {
  const double slack = 1e-6;  // a box scaled with a drafted JPEG may end a rounding past it
  if (out_h <= 0 || out_w <= 0 || x0 < -slack || y0 < -slack || x1 > width + slack ||
      y1 > height + slack || x1 <= x0 || y1 <= y0) {
    return -1;
  }
  const Coefficients v = Compute(y0, y1, height, out_h);
  const Coefficients h = Compute(x0, x1, width, out_w);
  // first + count never decreases along an axis: the first and last outputs bound the taps
  if (v.first.front() < row0 || v.first.back() + v.count.back() > row0 + rows ||
      h.first.front() < col0 || h.first.back() + h.count.back() > col0 + cols) {
    return -2;
  }
  const Tiles tiles = Densify(h, out_w);
  const int64_t c0 = h.first.front();
  const int64_t n = (h.first.back() + h.count.back() - c0) * 3;  // values per input row used
  thread_local std::vector<float> line;  // kept: a fresh one per call page-faults
  line.resize(n);
  for (int64_t y = 0; y < out_h; ++y) {
    float* __restrict acc = line.data();
    std::fill(acc, acc + n, 0.0f);
    for (int64_t k = 0; k < v.count[y]; ++k) {  // vertical: along the row
      const float w = v.weights[y * v.taps + k];
      const uint8_t* __restrict in = src + (v.first[y] + k - row0) * stride + (c0 - col0) * 3;
      for (int64_t j = 0; j < n; ++j) acc[j] += w * in[j];
    }
    uint8_t* row = dst + y * out_w * 3;
    for (size_t t = 0; t < tiles.lo.size(); ++t) {  // horizontal: kLanes outputs at a time
      // Two sets of sums, pixels p and p + 1: the adds' latency, not their count, bounds this.
      Vec r0 = {}, g0 = {}, b0 = {}, r1 = {}, g1 = {}, b1 = {};
      const float* w = tiles.weights.data() + tiles.offset[t];
      const float* px = acc + (tiles.lo[t] - c0) * 3;
      int64_t p = tiles.lo[t];
      for (; p + 1 < tiles.hi[t]; p += 2, w += 2 * kLanes, px += 6) {
        const Vec w0 = Load(w), w1 = Load(w + kLanes);
        r0 += w0 * px[0], g0 += w0 * px[1], b0 += w0 * px[2];
        r1 += w1 * px[3], g1 += w1 * px[4], b1 += w1 * px[5];
      }
      if (p < tiles.hi[t]) {
        const Vec w0 = Load(w);
        r0 += w0 * px[0], g0 += w0 * px[1], b0 += w0 * px[2];
      }
      const IVec ri = Round8(r0 + r1), gi = Round8(g0 + g1), bi = Round8(b0 + b1);
      const int64_t first = t * kLanes, lanes = std::min<int64_t>(kLanes, out_w - first);
      for (int64_t l = 0; l < lanes; ++l) {
        uint8_t* out = row + (flip ? out_w - 1 - first - l : first + l) * 3;
        out[0] = static_cast<uint8_t>(ri[l]);
        out[1] = static_cast<uint8_t>(gi[l]);
        out[2] = static_cast<uint8_t>(bi[l]);
      }
    }
  }
  return 0;
}
