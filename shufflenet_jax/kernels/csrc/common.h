// Shared by the network's C++ CPU kernels (depthwise_grad.cc, dense_grad.cc, batch_norm.cc,
// inference.cc), each a family of XLA FFI handlers over float32 NHWC arrays, padding k/2 as in
// PyTorch (docs/performance.md): channel padding, vector loops, the parallel loop over XLA's
// intra-op thread pool, deterministic chunked sums, and the convolution geometry.
//
// Gradients are summed per output row in float32 (BatchNorm's sums per block of 128 rows of C
// channels), rows or blocks into double accumulators (one set per chunk of the batch), and the
// chunks in a fixed order: the result does not depend on threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Internal to each kernel file that includes it.
namespace {

using namespace shufflenet;  // vec.h: kLanes-float vectors, one register each

// Channels padded to multiples of kPad (vec.h): whole half vectors with AVX-512, whole vectors
// elsewhere; the 24-channel stem stays 24, 116 channels become 120.
inline int64_t RoundUpPad(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

// f(c, V{}) for vectors V of channels [c, c + kLanesOf<V>) covering cp, a multiple of kPad:
// whole vectors, then a half vector where cp ends in one (AVX-512 only).
template <typename F>
void ForVectors(int64_t cp, F&& f) {
  int64_t c = 0;
  for (; c + kLanes <= cp; c += kLanes) f(c, Vec{});
  if constexpr (kPad < kLanes) {
    if (c < cp) f(c, Half{});
  }
}

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

// Both kernel gradients take (x, g) and the stride, and return the gradient buffer.
auto KernelGradBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride");
}

}  // namespace
