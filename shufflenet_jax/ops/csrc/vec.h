// Vectors of kLanes floats, one machine register each: 16 with AVX-512, else 8 (AVX2's ymm;
// two q registers with NEON). With 16-float vectors on AVX2, GCC assembled every load and
// store through general registers and the stack: the stage kernel ran 4x slower than XLA.
// Shared by kernels.cc and resample.cc (native.py's build key hashes this file too).
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

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// s - 0.0f is s for every s, so this folds to one broadcast (from memory where s was loaded);
// `Vec{} + s` must add 0.0f first (-0.0f + 0.0f is +0.0f): a scalar add and a register
// broadcast per use, in the matmul's innermost loop.
inline Vec Broadcast(float s) { return s - Vec{}; }

}  // namespace shufflenet
