// GroupNorm (+ SiLU) over channels-last float32 images, torch's definition: groups of adjacent
// channels, biased variance, two passes. One image at a time, so the three passes over it
// (channel sums, squared deviations, normalise + affine + SiLU) run from L2 cache.
//
// SiLU is h + h tanh(h), h = x / 2, with the rational tanh of hold_mlx/fastops.py; its
// coefficients come from there as the macros HOLD_TANH_P / HOLD_TANH_Q (native.py passes them).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace hold_native {

inline float silu(float x) {
  constexpr float P[5] = HOLD_TANH_P, Q[5] = HOLD_TANH_Q;
  constexpr float kClip = 9.f;  // tanh rounds to +-1 beyond
  const float h = 0.5f * x;
  const float y = std::min(std::max(h, -kClip), kClip);
  const float s = y * y, s2 = s * s;
  const float p = (P[4] * s2 + (P[3] * s + P[2])) * s2 + (P[1] * s + P[0]);
  const float q = (Q[4] * s2 + (Q[3] * s + Q[2])) * s2 + (Q[1] * s + Q[0]);
  return h * (y * p / q) + h;
}

// x, out (B, P, C) with P pixels; gamma, beta (C).
inline void group_norm(const float* x, const float* gamma, const float* beta, float* out, int B, int P, int C,
                       int groups, float eps, bool act) {
  const int per_group = C / groups;
  const double count = double(P) * per_group;
  thread_local std::vector<float> scratch;
  scratch.resize(std::size_t(4) * C);
  // Plain restrict pointers: through the vectors, the compiler cannot prove the loops free of
  // aliasing and leaves them scalar (5x slower).
  float* __restrict sums = scratch.data();
  float* __restrict means = sums + C;
  float* __restrict scale = means + C;
  float* __restrict shift = scale + C;
  for (int n = 0; n < B; ++n) {
    const float* __restrict xn = x + std::size_t(n) * P * C;
    float* __restrict on = out + std::size_t(n) * P * C;
    // Pass 1: group means.
    std::fill(sums, sums + C, 0.f);
    for (int p = 0; p < P; ++p)
      for (int c = 0; c < C; ++c) sums[c] += xn[std::size_t(p) * C + c];
    for (int g = 0; g < groups; ++g) {
      double s = 0;
      for (int c = g * per_group; c < (g + 1) * per_group; ++c) s += sums[c];
      std::fill(means + g * per_group, means + (g + 1) * per_group, float(s / count));
    }
    // Pass 2: group variances from squared deviations (no cancellation, like torch).
    std::fill(sums, sums + C, 0.f);
    for (int p = 0; p < P; ++p)
      for (int c = 0; c < C; ++c) {
        const float d = xn[std::size_t(p) * C + c] - means[c];
        sums[c] += d * d;
      }
    for (int g = 0; g < groups; ++g) {
      double s = 0;
      for (int c = g * per_group; c < (g + 1) * per_group; ++c) s += sums[c];
      const float rstd = float(1.0 / std::sqrt(s / count + double(eps)));
      for (int c = g * per_group; c < (g + 1) * per_group; ++c) {
        scale[c] = gamma[c] * rstd;
        shift[c] = beta[c] - means[c] * scale[c];
      }
    }
    // Pass 3: normalise, affine map, SiLU.
    for (int p = 0; p < P; ++p) {
      const float* __restrict xp = xn + std::size_t(p) * C;
      float* __restrict op = on + std::size_t(p) * C;
      if (act)
        for (int c = 0; c < C; ++c) op[c] = silu(xp[c] * scale[c] + shift[c]);
      else
        for (int c = 0; c < C; ++c) op[c] = xp[c] * scale[c] + shift[c];
    }
  }
}

}  // namespace hold_native
