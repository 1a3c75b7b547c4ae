// Vectors of kLanes floats, one machine register each: 16 with AVX-512, else 8 (AVX2's ymm;
// two q registers with NEON). With 16-float vectors on AVX2, GCC assembled every load and
// store through general registers and the stack: the stage kernel ran 4x slower than XLA.
// Shared by the network kernels (common.h) and resample.cc (build.py hashes every header into
// each library's cache key).
#pragma once

#include <cstdint>
#include <cstring>

namespace shufflenet {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif

typedef float Vec __attribute__((vector_size(4 * kLanes)));
typedef int32_t IVec __attribute__((vector_size(4 * kLanes)));
// Half a vector (AVX-512's ymm): channel counts are padded to whole half vectors there, since
// on Zen 4 a ymm multiply-add costs half a zmm one (116 channels as 120, not 128).
constexpr int kHalfLanes = kLanes / 2;
typedef float Half __attribute__((vector_size(4 * kHalfLanes)));

// Channels are padded to multiples of kPad floats: whole half vectors with AVX-512, whole
// vectors elsewhere (AVX2's xmm multiply-adds cost what its ymm ones cost).
#if defined(__AVX512F__)
constexpr int kPad = kLanes / 2;
#else
constexpr int kPad = kLanes;
#endif

inline Half LowHalf(Vec v) {
  Half h;
  std::memcpy(&h, &v, sizeof h);
  return h;
}

template <typename V>
constexpr int kLanesOf = sizeof(V) / sizeof(float);

template <typename V = Vec>
inline V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
inline void Store(float* p, V v) { std::memcpy(p, &v, sizeof v); }

// s - 0.0f is s for every s, so this folds to one broadcast (from memory where s was loaded);
// `V{} + s` must add 0.0f first (-0.0f + 0.0f is +0.0f): a scalar add and a register
// broadcast per use, in the matmul's innermost loop.
template <typename V = Vec>
inline V Broadcast(float s) { return s - V{}; }

}  // namespace shufflenet
