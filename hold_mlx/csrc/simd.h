// The vector type of this build: GCC/Clang vector extensions, as wide as the instruction set the
// build targets (hold_mlx/native.py compiles one build per set): 16 float lanes with AVX-512,
// 8 with AVX2, 4 with SSE2 / NEON. Explicit vectors rather than auto-vectorised loops: GCC
// vectorises the clipped SiLU and the per-channel sums with AVX-512 masks but leaves them scalar
// with AVX2 (10x slower), so the kernels spell the vectors out.
#pragma once

#include <type_traits>

namespace hold_native {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));

// Unaligned vector load and store as one instruction each. (std::memcpy into a vec local made
// GCC build the vector on the stack from two 128-bit halves with AVX2 and reload it whole: a
// failed store-to-load forward per weight, which made the AVX2 convolution 10x slower.)
inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }

// T = vec or float: the same element-wise code for whole vectors and for the scalar tail.
template <class T>
inline T ld(const float* p) {
  if constexpr (std::is_same_v<T, float>) return *p; else return load(p);
}
template <class T>
inline void st(float* p, T v) {
  if constexpr (std::is_same_v<T, float>) *p = v; else store(p, v);
}
template <class T>
inline T splat(float x) {
  return T{} + x;
}
template <class T>
inline T min(T a, T b) { return a < b ? a : b; }
template <class T>
inline T max(T a, T b) { return a > b ? a : b; }

// f(T{}, c) for c = 0, kLanes, ... with T = vec while a whole vector fits, then T = float.
template <class F>
inline void for_lanes(int n, F&& f) {
  int c = 0;
  for (; c + kLanes <= n; c += kLanes) f(vec{}, c);
  for (; c < n; ++c) f(0.f, c);
}

}  // namespace hold_native
