// The stem's 3x3 stride-2 convolution (forward), and inference with each BatchNorm folded into
// its convolution as the weights are copied: the stem with its max-pool, and whole stages of
// ShuffleNet V2 units, each image band through all of a unit's (or a stage's) layers while it
// is in the cache, where XLA makes a pass over memory per layer; their 1x1 convolutions
// through one register-blocked matmul kernel.

#include "common.h"

namespace {

// The micro-kernel's accumulators (kRows x kVectors vectors) must fit the vector registers
// with room for kVectors loads of b and one broadcast, or they spill on every step of k: 24
// of AVX-512's 32 zmm and 12 of AVX2's 16 ymm registers; 24 of NEON's 32 q registers; 8 of
// SSE's 16 xmm registers (two per vector) elsewhere.
#if defined(__AVX512F__)
constexpr int64_t kRows = 6, kVectors = 4;
#elif defined(__AVX2__) || defined(__ARM_NEON)
constexpr int64_t kRows = 6, kVectors = 2;
#else
constexpr int64_t kRows = 4, kVectors = 1;
#endif

// ---------------------------------------------------------------------------------------------
// Inference of ShuffleNet V2 units with BatchNorm folded (convolutions with biases), a stage at
// a time:
//   stride 1: out = shuffle(concat(x[..., :h], relu(pw2(dw(relu(pw1(x[..., h:])))))))
//   stride 2: out = shuffle(concat(relu(pw3(dw1(x))), relu(pw2(dw(relu(pw1(x)))))))
// where pw* are 1x1 convolutions plus bias, dw* 3x3 depthwise convolutions (stride 1 or 2,
// padding 1) plus bias. XLA runs these as about ten separate passes over memory (matmuls,
// element-wise fusions, concatenate, transpose); here each band of rows of one image goes
// through all of them while it is in the cache, and is written once, already shuffled.

#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")  // a * b + c as one fused multiply-add

// Lanes of (a, b) interleaved: a0 b0 a1 b1 ... (the low half of the lanes), then the high half.
template <int... I>
constexpr IVec InterleaveMask(std::integer_sequence<int, I...>, int half) {
  return IVec{((I % 2) * kLanes + half * kLanes / 2 + I / 2)...};
}
constexpr IVec kInterleaveLow = InterleaveMask(std::make_integer_sequence<int, kLanes>{}, 0);
constexpr IVec kInterleaveHigh = InterleaveMask(std::make_integer_sequence<int, kLanes>{}, 1);

template <typename V>
V Relu(V v) { return v > V{} ? v : V{}; }

// c_r[0:n] = act(sum_s a[s][r, 0:k] @ b[s*k:(s+1)*k, 0:n] + bias) for r < MR, n = NV whole
// vectors and NH half vectors: S row segments of the left operand, each from its own matrix
// (rows lda apart), against consecutive row blocks of b (rows ldb apart); c_r = c(r). The
// accumulators stay in registers for the whole of S * k.
template <int MR, int NV, int NH, int S, typename RowOut>
void MicroKernel(const float* const* a, int64_t lda, const float* __restrict b, int64_t ldb,
                 int64_t k, const float* __restrict bias, bool relu, const RowOut& c) {
  Vec acc[MR][NV > 0 ? NV : 1];
  Half hacc[MR][NH > 0 ? NH : 1];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = Load(bias + kLanes * v);
    for (int v = 0; v < NH; ++v) hacc[r][v] = Load<Half>(bias + kLanes * NV + kHalfLanes * v);
  }
  for (int s = 0; s < S; ++s) {
    const float* __restrict as = a[s];
    const float* __restrict bs = b + s * k * ldb;
    for (int64_t p = 0; p < k; ++p) {
      Vec bv[NV > 0 ? NV : 1];
      Half hv[NH > 0 ? NH : 1];
      for (int v = 0; v < NV; ++v) bv[v] = Load(bs + p * ldb + kLanes * v);
      for (int v = 0; v < NH; ++v) hv[v] = Load<Half>(bs + p * ldb + kLanes * NV + kHalfLanes * v);
      for (int r = 0; r < MR; ++r) {
        const Vec av = Broadcast(as[r * lda + p]);
        const Half ah = LowHalf(av);  // the same register, not a second broadcast
        for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
        for (int v = 0; v < NH; ++v) hacc[r][v] += ah * hv[v];
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* row = c(r);
    for (int v = 0; v < NV; ++v) Store(row + kLanes * v, relu ? Relu(acc[r][v]) : acc[r][v]);
    for (int v = 0; v < NH; ++v) {
      Store(row + kLanes * NV + kHalfLanes * v, relu ? Relu(hacc[r][v]) : hacc[r][v]);
    }
  }
}

static_assert(kPad == kLanes || kVectors == 4, "MicroColumns' half-vector widths");

// MicroKernel for nv whole vectors (at most kVectors), and a half vector after them if half
// (then nv < kVectors; AVX-512 only): only those widths are instantiated.
template <int MR, int S, typename RowOut>
void MicroColumns(int64_t nv, bool half, const float* const* a, int64_t lda, const float* b,
                  int64_t ldb, int64_t k, const float* bias, bool relu, const RowOut& c) {
  if constexpr (kPad < kLanes) {
    if (half) {
      switch (nv) {
        case 0: return MicroKernel<MR, 0, 1, S>(a, lda, b, ldb, k, bias, relu, c);
        case 1: return MicroKernel<MR, 1, 1, S>(a, lda, b, ldb, k, bias, relu, c);
        case 2: return MicroKernel<MR, 2, 1, S>(a, lda, b, ldb, k, bias, relu, c);
        default: return MicroKernel<MR, 3, 1, S>(a, lda, b, ldb, k, bias, relu, c);
      }
    }
  }
  switch (std::min<int64_t>(nv, kVectors)) {
    case 1: return MicroKernel<MR, 1, 0, S>(a, lda, b, ldb, k, bias, relu, c);
    case 2: return MicroKernel<MR, (kVectors < 2 ? 1 : 2), 0, S>(a, lda, b, ldb, k, bias, relu, c);
    case 3: return MicroKernel<MR, (kVectors < 3 ? 1 : 3), 0, S>(a, lda, b, ldb, k, bias, relu, c);
    default: return MicroKernel<MR, kVectors, 0, S>(a, lda, b, ldb, k, bias, relu, c);
  }
}

// Output row m, columns j.. of act(sum_s a[s][m, 0:k] @ b[s*k:(s+1)*k] + bias) go to
// out(m) + j, for m < rows; b is (S * k, np) with np a multiple of kPad (zero columns past
// the real outputs), bias has np entries.
template <int S, typename RowPtr>
void MatmulSegments(const std::array<const float*, S>& a, int64_t lda, int64_t rows, int64_t k,
                    const float* b, int64_t np, const float* bias, bool relu, const RowPtr& out) {
  for (int64_t j = 0; j < np; j += kLanes * kVectors) {
    const int64_t width = std::min<int64_t>(kLanes * kVectors, np - j);
    const int64_t nv = width / kLanes;
    const bool half = width % kLanes != 0;
    for (int64_t i = 0; i < rows; i += kRows) {
      std::array<const float*, S> ai;
      for (int s = 0; s < S; ++s) ai[s] = a[s] + i * lda;
      auto c = [&](int64_t r) { return out(i + r) + j; };
      const float* const* ap = ai.data();
      switch (std::min<int64_t>(kRows, rows - i)) {
        case 1: MicroColumns<1, S>(nv, half, ap, lda, b + j, np, k, bias + j, relu, c); break;
        case 2: MicroColumns<2, S>(nv, half, ap, lda, b + j, np, k, bias + j, relu, c); break;
        case 3: MicroColumns<3, S>(nv, half, ap, lda, b + j, np, k, bias + j, relu, c); break;
        case 4: MicroColumns<4, S>(nv, half, ap, lda, b + j, np, k, bias + j, relu, c); break;
        case 5: MicroColumns<5, S>(nv, half, ap, lda, b + j, np, k, bias + j, relu, c); break;
        default: MicroColumns<6, S>(nv, half, ap, lda, b + j, np, k, bias + j, relu, c); break;
      }
    }
  }
}

// Output row m, columns j.. of act(a[m, 0:k] @ b + bias) go to out(m) + j (MatmulSegments, S 1).
template <typename RowPtr>
void Matmul(const float* a, int64_t lda, int64_t rows, int64_t k, const float* b, int64_t np,
            const float* bias, bool relu, const RowPtr& out) {
  MatmulSegments<1>({a}, lda, rows, k, b, np, bias, relu, out);
}

// Dense output rows ld apart.
struct Rows {
  float* base;
  int64_t ld;
  float* operator()(int64_t m) const { return base + m * ld; }
};

// out[r, w, :] = bias + sum_{i, j} in[s*r + i, s*w + j, :] * k[3*i + j, :] for r < rows,
// w < cols: a 3x3 depthwise convolution of `in` (already padded, in_cols columns, cp channels).
// A vector of channels at a time, its nine weights in registers, along each output row with
// the inputs it shares with the next column kept: per output 3 loads at stride 1 (of 19).
void Depthwise(const float* __restrict in, int64_t in_cols, int64_t cp, int64_t rows,
               int64_t cols, int64_t s, const float* __restrict k, const float* __restrict bias,
               float* __restrict out) {
  ForVectors(cp, [&](int64_t c, auto lanes) {
    using V = decltype(lanes);
    V kv[9];
    for (int t = 0; t < 9; ++t) kv[t] = Load<V>(k + t * cp + c);
    const V bv = Load<V>(bias + c);
    for (int64_t r = 0; r < rows; ++r) {
      const float* row[3];
      V left[3], mid[3];  // input columns s*w and s*w + 1 of each kernel row
      for (int i = 0; i < 3; ++i) {
        row[i] = in + (s * r + i) * in_cols * cp + c;
        left[i] = Load<V>(row[i]);
        mid[i] = Load<V>(row[i] + cp);
      }
      float* o = out + r * cols * cp + c;
      for (int64_t w = 0; w < cols; ++w) {
        V acc = bv;
        for (int i = 0; i < 3; ++i) {  // the same order of sums as tap by tap
          const V right = Load<V>(row[i] + (s * w + 2) * cp);
          acc += left[i] * kv[3 * i];
          acc += mid[i] * kv[3 * i + 1];
          acc += right * kv[3 * i + 2];
          if (s == 1) {
            left[i] = mid[i], mid[i] = right;
          } else if (w + 1 < cols) {  // stride 2: the next column pair starts at this right
            left[i] = right, mid[i] = Load<V>(row[i] + (2 * w + 3) * cp);
          }
        }
        Store(o + w * cp, acc);
      }
    }
  });
}

// A weight matrix (rows, cols) copied into (rows, RoundUpPad(cols)) with zero columns,
// column j multiplied by scale[j] when a scale is given (an eval-mode BatchNorm folded as the
// weights are copied; XLA would write a folded copy of every kernel on each call first); a
// vector into RoundUpPad entries. Zero weights and biases keep the padding channels at zero.
std::vector<float> PadColumns(const float* w, int64_t rows, int64_t cols,
                              const float* scale = nullptr) {
  const int64_t np = RoundUpPad(cols);
  std::vector<float> out(rows * np, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = out.data() + r * np;
    const float* src = w + r * cols;
    if (scale == nullptr) {
      std::copy(src, src + cols, dst);
    } else {
      for (int64_t j = 0; j < cols; ++j) dst[j] = src[j] * scale[j];
    }
  }
  return out;
}

const float* Floats(const ffi::AnyBuffer& a) { return static_cast<const float*>(a.untyped_data()); }

// An inference BatchNorm as y * scale + bias per channel, from its buffers (gamma, beta,
// running mean, running variance): scale = gamma / sqrt(var + eps), bias = beta - mean * scale.
// Computed here, not by XLA, which would run a small kernel per BatchNorm on each call.
struct Affine {
  std::vector<float> scale, bias;
  Affine(const ffi::AnyBuffer* norm, float eps, int64_t n) : scale(n), bias(n) {
    const float *gamma = Floats(norm[0]), *beta = Floats(norm[1]);
    const float *mean = Floats(norm[2]), *var = Floats(norm[3]);
    for (int64_t j = 0; j < n; ++j) {
      scale[j] = gamma[j] / std::sqrt(var[j] + eps);
      bias[j] = beta[j] - mean[j] * scale[j];
    }
  }
};

// A 1x1 convolution (C_in, C_out), its columns scaled (a folded BatchNorm; none: 1), with
// bias, columns padded to multiples of kPad.
struct Pointwise {
  std::vector<float> w, b;
  int64_t k;
  Pointwise(const float* w_, const float* scale, const float* b_, int64_t k_, int64_t n)
      : w(PadColumns(w_, k_, n, scale)), b(PadColumns(b_, 1, n)), k(k_) {}
  Pointwise(const ffi::AnyBuffer& w_, const Affine& a)
      : Pointwise(Floats(w_), a.scale.data(), a.bias.data(), w_.dimensions()[0],
                  w_.dimensions()[1]) {}
  // conv[0]: the kernel; conv[1..4]: its BatchNorm's buffers
  Pointwise(const ffi::AnyBuffer* conv, float eps)
      : Pointwise(conv[0], Affine(conv + 1, eps, conv[0].dimensions()[1])) {}
};

// A (9, C) kernel scaled per channel by its BatchNorm (conv[1..4]), its bias, padded to
// multiples of kPad.
struct DepthwiseWeights {
  std::vector<float> k, b;
  DepthwiseWeights(const ffi::AnyBuffer* conv, float eps) {
    const int64_t c = conv[0].dimensions()[1];
    const Affine a(conv + 1, eps, c);
    k = PadColumns(Floats(conv[0]), 9, c, a.scale.data());
    b = PadColumns(a.bias.data(), 1, c);
  }
};

struct UnitShape {
  int64_t h, w, c;     // input image
  int64_t s, ho, wo;   // stride, output rows and columns
  int64_t half;        // output channels of each branch
};

// A padded band of input rows for a stride-s 3x3 depthwise conv producing output rows
// [r0, r1): rows s*r0 - 1 .. s*(r1 - 1) + 1 of the image, one zero column on each side.
// fill(row, dst) writes the cp channels of the image row's w pixels to dst (stride cp).
template <typename Fill>
void PaddedBand(const UnitShape& u, int64_t r0, int64_t r1, int64_t cp, float* band, Fill&& fill) {
  const int64_t rows = u.s * (r1 - 1 - r0) + 3, cols = u.w + 2;
  for (int64_t i = 0; i < rows; ++i) {
    float* dst = band + i * cols * cp;
    const int64_t hi = u.s * r0 - 1 + i;
    if (hi < 0 || hi >= u.h) {
      std::fill(dst, dst + cols * cp, 0.0f);
      continue;
    }
    std::fill(dst, dst + cp, 0.0f);
    std::fill(dst + (cols - 1) * cp, dst + cols * cp, 0.0f);
    fill(hi, dst + cp);
  }
}

template <typename T>
T* Scratch(std::vector<T>& buf, int64_t size) {
  if (static_cast<int64_t>(buf.size()) < size) buf.resize(size);
  return buf.data();
}

struct Unit {
  UnitShape u;
  Pointwise pw1;
  DepthwiseWeights dw;
  Pointwise pw2;
  std::optional<DepthwiseWeights> dw1;  // branch 1, stride 2 only
  std::optional<Pointwise> pw3;
};

// Output rows [r0, r1) of one image of the unit: image is (h, w, c), out (ho, wo, 2 * half).
void UnitRows(const Unit& unit, const float* image, int64_t r0, int64_t r1, float* out) {
  const UnitShape& u = unit.u;
  const int64_t hp = RoundUpPad(u.half), cp = RoundUpPad(u.c);
  const int64_t rows_in = u.s * (r1 - 1 - r0) + 3, m = (r1 - r0) * u.wo;
  thread_local std::vector<float> buffers[5];
  float* a = Scratch(buffers[0], rows_in * (u.w + 2) * hp);
  float* b = Scratch(buffers[1], m * std::max(cp, hp));
  float* odd = Scratch(buffers[2], m * hp);
  // branch 2's first 1x1 conv on the image rows the band needs, in one matmul
  const int64_t h0 = std::max<int64_t>(0, u.s * r0 - 1);
  const int64_t h1 = std::min<int64_t>(u.h, u.s * (r1 - 1) + 2);
  const int64_t x_off = u.s == 1 ? u.half : 0;  // stride 1: branch 2 sees the second half
  PaddedBand(u, r0, r1, hp, a, [](int64_t, float*) {});  // the zeros; the matmul fills the rest
  float* first = a + ((h0 - (u.s * r0 - 1)) * (u.w + 2) + 1) * hp;
  Matmul(image + h0 * u.w * u.c + x_off, u.c, (h1 - h0) * u.w, unit.pw1.k, unit.pw1.w.data(), hp,
         unit.pw1.b.data(), true,
         [&](int64_t i) { return first + (i / u.w * (u.w + 2) + i % u.w) * hp; });
  Depthwise(a, u.w + 2, hp, r1 - r0, u.wo, u.s, unit.dw.k.data(), unit.dw.b.data(), b);
  Matmul(b, hp, m, unit.pw2.k, unit.pw2.w.data(), hp, unit.pw2.b.data(), true, Rows{odd, hp});
  const float* even;  // the first branch's output, (m, ld_even)
  int64_t ld_even;
  if (u.s == 1) {
    even = image + r0 * u.w * u.c;
    ld_even = u.c;
  } else {
    float* band = Scratch(buffers[3], rows_in * (u.w + 2) * cp);
    float* d = Scratch(buffers[4], m * hp);
    PaddedBand(u, r0, r1, cp, band, [&](int64_t hi, float* dst) {
      const float* src = image + hi * u.w * u.c;
      if (cp == u.c) {
        std::copy(src, src + u.w * u.c, dst);
        return;
      }
      for (int64_t w = 0; w < u.w; ++w) {  // vectors, not a library call per pixel
        const float* from = src + w * u.c;
        float* to = dst + w * cp;
        int64_t c = 0;
        for (; c + kLanes <= u.c; c += kLanes) Store(to + c, Load(from + c));
        for (; c + kHalfLanes <= u.c; c += kHalfLanes) Store(to + c, Load<Half>(from + c));
        for (; c < u.c; ++c) to[c] = from[c];
        for (; c < cp; ++c) to[c] = 0.0f;
      }
    });
    Depthwise(band, u.w + 2, cp, r1 - r0, u.wo, 2, unit.dw1->k.data(), unit.dw1->b.data(), b);
    Matmul(b, cp, m, unit.pw3->k, unit.pw3->w.data(), hp, unit.pw3->b.data(), true, Rows{d, hp});
    even = d;
    ld_even = hp;
  }
  const int64_t half = u.half;
  float* o = out + r0 * u.wo * 2 * half;
  for (int64_t p = 0; p < m; ++p) {
    const float* e = even + p * ld_even;
    const float* q = odd + p * hp;
    float* dst = o + p * 2 * half;
    auto interleave = [&](int64_t k) {
      const Vec ev = Load(e + k), qv = Load(q + k);
      Store(dst + 2 * k, __builtin_shuffle(ev, qv, kInterleaveLow));
      Store(dst + 2 * k + kLanes, __builtin_shuffle(ev, qv, kInterleaveHigh));
    };
    int64_t k = 0;
    for (; k + kLanes <= half; k += kLanes) interleave(k);
    if (k < half && half >= kLanes) {
      interleave(half - kLanes);  // the last vector again, overlapping: the same values
    } else {
      for (; k < half; ++k) dst[2 * k] = e[k], dst[2 * k + 1] = q[k];
    }
  }
}

int64_t InputSize(const UnitShape& u) { return u.h * u.w * u.c; }
int64_t OutputSize(const UnitShape& u) { return u.ho * u.wo * 2 * u.half; }

// The units one after another on x (n images). With at least as many images as threads, each
// image goes through all units while it is in the cache; otherwise unit by unit, each image's
// rows split into bands so that every thread has work.
void StageInfer(ffi::ThreadPool& pool, const std::vector<Unit>& units, int64_t n, const float* x,
                float* out) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (n >= threads) {
    ParallelFor(pool, n, [&](int64_t i) {
      thread_local std::vector<float> ping, pong;
      const float* src = x + i * InputSize(units.front().u);
      for (size_t k = 0; k < units.size(); ++k) {
        const UnitShape& u = units[k].u;
        float* dst = k + 1 == units.size() ? out + i * OutputSize(u)
                                           : Scratch(k % 2 ? pong : ping, OutputSize(u));
        UnitRows(units[k], src, 0, u.ho, dst);
        src = dst;
      }
    });
    return;
  }
  std::vector<float> between[2];
  const float* src = x;
  for (size_t k = 0; k < units.size(); ++k) {
    const UnitShape& u = units[k].u;
    float* dst = k + 1 == units.size() ? out : Scratch(between[k % 2], n * OutputSize(u));
    const int64_t bands = std::min<int64_t>(u.ho, (2 * threads + n - 1) / n);
    const int64_t band_rows = (u.ho + bands - 1) / bands;
    ParallelFor(pool, n * bands, [&](int64_t chunk) {
      const int64_t i = chunk / bands, r0 = std::min(u.ho, chunk % bands * band_rows);
      const int64_t r1 = std::min(u.ho, r0 + band_rows);
      if (r0 < r1) UnitRows(units[k], src + i * InputSize(u), r0, r1, dst + i * OutputSize(u));
    });
    src = dst;
  }
}

// ---------------------------------------------------------------------------------------------
// The stem's 3x3 stride-2 convolution (the training forward pass, each output row through the
// matmul kernel instead of XLA's 27 multiply-adds over a padded copy of the input) and, for
// inference with BatchNorm folded, max_pool_3x3_s2(relu(conv_3x3_s2(x) + bias)),
// both padded by 1. Each band of pooled rows computes the convolution rows it needs (one matmul
// per row over its three input rows) and pools them while they are in the cache; XLA writes and
// re-reads the 4x larger convolution output.

// Rows [c0, c1) of act(conv_3x3_s2(image) + bias) (padding 1) into rows, (c1 - c0, wc, cp).
// Output column col of kernel row i reads 3 * C_in contiguous values of input row 2r + i - 1
// from (2 col - 1) * C_in: the three padded input rows, 2 * C_in apart per column, are the
// matmul's three left-operand segments, with no patches copied.
void ConvRows(const float* image, int64_t h, int64_t w, int64_t cin, const Pointwise& conv,
              bool relu, int64_t c0, int64_t c1, float* rows) {
  const int64_t wc = (w - 1) / 2 + 1, k = 3 * cin, cp = conv.w.size() / (9 * cin);
  const int64_t width = (2 * wc + 1) * cin;  // a padded input row, zero at both ends
  thread_local std::vector<float> row_buf;
  float* padded = Scratch(row_buf, 4 * width);  // three input rows and a zero row
  std::fill(padded, padded + 4 * width, 0.0f);
  const float* zero = padded + 3 * width;
  for (int64_t r = c0; r < c1; ++r) {
    std::array<const float*, 3> a;
    for (int64_t i = 0; i < 3; ++i) {  // input row hi in slot hi % 3: row r + 1 reuses 2r + 1
      const int64_t hi = 2 * r + i - 1;
      if (hi < 0 || hi >= h) {
        a[i] = zero;
        continue;
      }
      float* dst = padded + hi % 3 * width;
      if (r == c0 || i > 0) std::copy(image + hi * w * cin, image + (hi + 1) * w * cin, dst + cin);
      a[i] = dst;
    }
    MatmulSegments<3>(a, 2 * cin, wc, k, conv.w.data(), cp, conv.b.data(), relu,
                      Rows{rows + (r - c0) * wc * cp, cp});
  }
}

// Pooled rows [p0, p1) of one image of the folded stem: max_pool_3x3_s2(relu(conv + bias)).
void StemRows(const float* image, int64_t h, int64_t w, int64_t cin, const Pointwise& conv,
              int64_t cout, int64_t p0, int64_t p1, float* out) {
  const int64_t hc = (h - 1) / 2 + 1, wc = (w - 1) / 2 + 1, wp = (wc - 1) / 2 + 1;
  const int64_t cp = RoundUpPad(cout);
  const int64_t c0 = std::max<int64_t>(0, 2 * p0 - 1), c1 = std::min<int64_t>(hc, 2 * p1);
  thread_local std::vector<float> conv_buf;
  float* rows = Scratch(conv_buf, (c1 - c0) * wc * cp);
  ConvRows(image, h, w, cin, conv, true, c0, c1, rows);
  // After the ReLU every value is >= 0, so windows simply skip the padding.
  for (int64_t pr = p0; pr < p1; ++pr) {
    const int64_t r0 = std::max<int64_t>(c0, 2 * pr - 1), r1 = std::min<int64_t>(c1, 2 * pr + 2);
    for (int64_t pc = 0; pc < wp; ++pc) {
      const int64_t q0 = std::max<int64_t>(0, 2 * pc - 1), q1 = std::min<int64_t>(wc, 2 * pc + 2);
      float* dst = out + (pr * wp + pc) * cout;
      ForVectors(cp, [&](int64_t c, auto lanes) {
        using V = decltype(lanes);
        V m = Load<V>(rows + ((r0 - c0) * wc + q0) * cp + c);
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t q = q0; q < q1; ++q) {
            const V v = Load<V>(rows + ((r - c0) * wc + q) * cp + c);
            m = v > m ? v : m;
          }
        }
        if (c + kLanesOf<V> <= cout) {
          Store(dst + c, m);
        } else {
          for (int64_t i = c; i < cout; ++i) dst[i] = m[i - c];
        }
      });
    }
  }
}

#pragma GCC pop_options

bool IsMatrix(ffi::AnyBuffer a, int64_t rows, int64_t cols) {
  const auto d = a.dimensions();
  return a.element_type() == ffi::F32 && d.size() == 2 && d[0] == rows && d[1] == cols;
}

bool IsVector(ffi::AnyBuffer a, int64_t size) {
  return a.element_type() == ffi::F32 && a.dimensions().size() == 1 && a.dimensions()[0] == size;
}

// Weights per unit: w1, the depthwise kernel and w2 of branch 2, then for a stride-2 unit the
// depthwise kernel and w of branch 1, each followed by its BatchNorm's (gamma, beta, mean, var)
// (eps for all). 1x1 kernels are (C_in, C_out) matrices, depthwise kernels (9, C). Only the
// first unit may have stride 2.
ffi::Error ShuffleStage(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights,
                        ffi::ResultBuffer<ffi::F32> out, int64_t first_stride, float eps) {
  const auto xd = x.dimensions();
  if (xd.size() != 4 || (first_stride != 1 && first_stride != 2)) {
    return ffi::Error::InvalidArgument("shuffle stage: x must be NHWC, the stride 1 or 2");
  }
  std::vector<Unit> units;
  int64_t h = xd[1], w = xd[2], c = xd[3];
  for (size_t i = 0; i < weights.size();) {
    const int64_t s = units.empty() ? first_stride : 1;
    const size_t count = s == 1 ? 15 : 25;  // a kernel and 4 BatchNorm buffers per conv
    if (i + count > weights.size()) {
      return ffi::Error::InvalidArgument("shuffle stage: a unit's weights are incomplete");
    }
    std::vector<ffi::AnyBuffer> a;
    for (size_t j = 0; j < count; ++j) {
      auto arg = weights.get<ffi::AnyBuffer>(i + j);
      if (arg.has_error()) return arg.error();
      a.push_back(*arg);
    }
    const int64_t half = a[0].dimensions().size() == 2 ? a[0].dimensions()[1] : -1;
    const int64_t k1 = s == 1 ? half : c;
    auto conv = [&](size_t j, int64_t rows, int64_t cols) {  // a[j]: kernel; its BatchNorm
      bool ok = IsMatrix(a[j], rows, cols);
      for (size_t q = 1; q <= 4; ++q) ok = ok && IsVector(a[j + q], cols);
      return ok;
    };
    if ((s == 1 && c != 2 * half) || !conv(0, k1, half) || !conv(5, 9, half) ||
        !conv(10, half, half) || (s == 2 && (!conv(15, 9, c) || !conv(20, c, half)))) {
      return ffi::Error::InvalidArgument("shuffle stage: weight shapes do not match the input");
    }
    UnitShape u{h, w, c, s, (h - 1) / s + 1, (w - 1) / s + 1, half};
    units.push_back(Unit{u, Pointwise(&a[0], eps), DepthwiseWeights(&a[5], eps),
                         Pointwise(&a[10], eps), std::nullopt, std::nullopt});
    if (s == 2) {
      units.back().dw1.emplace(&a[15], eps);
      units.back().pw3.emplace(&a[20], eps);
    }
    h = u.ho, w = u.wo, c = 2 * half;
    i += count;
  }
  const auto od = out->dimensions();
  if (units.empty() || od.size() != 4 || od[0] != xd[0] || od[1] != h || od[2] != w || od[3] != c) {
    return ffi::Error::InvalidArgument("shuffle stage: no units, or output shape does not match");
  }
  StageInfer(pool, units, xd[0], x.typed_data(), out->typed_data());
  return ffi::Error::Success();
}

// x (N, H, W, C_in); kernel (9 * C_in, C_out) from HWIO; its BatchNorm's gamma, beta, mean
// and variance (C_out).
ffi::Error StemPool(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer kernel,
                    ffi::AnyBuffer gamma, ffi::AnyBuffer beta, ffi::AnyBuffer mean,
                    ffi::AnyBuffer var, ffi::ResultBuffer<ffi::F32> out, float eps) {
  const auto xd = x.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || od.size() != 4 || kernel.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("stem: x and out must be NHWC, the kernel a matrix");
  }
  const int64_t n = xd[0], h = xd[1], w = xd[2], cin = xd[3], cout = kernel.dimensions()[1];
  const int64_t hp = ((h - 1) / 2) / 2 + 1, wp = ((w - 1) / 2) / 2 + 1;
  const ffi::AnyBuffer norm[4] = {gamma, beta, mean, var};
  bool ok = IsMatrix(kernel, 9 * cin, cout) && od[0] == n && od[1] == hp && od[2] == wp &&
            od[3] == cout;
  for (const auto& b : norm) ok = ok && IsVector(b, cout);
  if (!ok) {
    return ffi::Error::InvalidArgument("stem: kernel, BatchNorm or output shape does not match x");
  }
  const Pointwise conv(kernel, Affine(norm, eps, cout));
  const int64_t band = 8;  // pooled rows per chunk: 17 convolution rows stay in the cache
  const int64_t bands = (hp + band - 1) / band;
  const float* xs = x.typed_data();
  float* os = out->typed_data();
  ParallelFor(pool, n * bands, [&](int64_t chunk) {
    const int64_t i = chunk / bands, p0 = chunk % bands * band;
    StemRows(xs + i * h * w * cin, h, w, cin, conv, cout, p0, std::min(hp, p0 + band),
             os + i * hp * wp * cout);
  });
  return ffi::Error::Success();
}

// x (N, H, W, C_in); kernel (9 * C_in, C_out) from HWIO; out (N, Hc, Wc, C_out).
ffi::Error StemConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer kernel,
                    ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || od.size() != 4 || kernel.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("stem conv: x and out must be NHWC, the kernel a matrix");
  }
  const int64_t n = xd[0], h = xd[1], w = xd[2], cin = xd[3], cout = kernel.dimensions()[1];
  const int64_t hc = (h - 1) / 2 + 1, wc = (w - 1) / 2 + 1, cp = RoundUpPad(cout);
  if (!IsMatrix(kernel, 9 * cin, cout) || od[0] != n || od[1] != hc || od[2] != wc ||
      od[3] != cout) {
    return ffi::Error::InvalidArgument("stem conv: kernel or output shape does not match x");
  }
  const std::vector<float> zeros(cout, 0.0f);
  const Pointwise conv(Floats(kernel), nullptr, zeros.data(), 9 * cin, cout);
  const int64_t band = 16;
  const int64_t bands = (hc + band - 1) / band;
  const float* xs = x.typed_data();
  float* os = out->typed_data();
  ParallelFor(pool, n * bands, [&](int64_t chunk) {
    const int64_t i = chunk / bands, c0 = chunk % bands * band, c1 = std::min(hc, c0 + band);
    float* dst = os + (i * hc + c0) * wc * cout;
    if (cp == cout) {  // no padding channels to drop: straight into the output
      ConvRows(xs + i * h * w * cin, h, w, cin, conv, false, c0, c1, dst);
      return;
    }
    thread_local std::vector<float> conv_buf;
    float* rows = Scratch(conv_buf, (c1 - c0) * wc * cp);
    ConvRows(xs + i * h * w * cin, h, w, cin, conv, false, c0, c1, rows);
    for (int64_t p = 0; p < (c1 - c0) * wc; ++p) {
      std::copy(rows + p * cp, rows + p * cp + cout, dst + p * cout);
    }
  });
  return ffi::Error::Success();
}


}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShufflenetStage, ShuffleStage,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("first_stride")
                                  .Attr<float>("eps"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ShufflenetStemPool, StemPool,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ShufflenetStemConv, StemConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
