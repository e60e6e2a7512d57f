// GroupNorm (+ SiLU) over channels-last float32 images, torch's definition: groups of adjacent
// channels, biased variance, two passes; and its gradient. One image at a time, so the passes
// over it (channel sums, squared deviations, normalise + affine + SiLU) run from L2 cache.
// Loops over channels run in explicit vectors of this build's width (simd.h).
//
// SiLU is h + h tanh(h), h = x / 2, with the rational tanh of hold_mlx/fastops.py; its
// coefficients come from there as the macros HOLD_TANH_P / HOLD_TANH_Q (native.py passes them).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "simd.h"

namespace hold_native {

// tanh(h) from fastops' rational fit on |h| <= 9 (tanh rounds to +-1 beyond); T = vec or float.
template <class T>
inline T tanh_fit(T h) {
  constexpr float P[5] = HOLD_TANH_P, Q[5] = HOLD_TANH_Q;
  constexpr float kClip = 9.f;
  const T y = min(max(h, splat<T>(-kClip)), splat<T>(kClip));
  const T s = y * y, s2 = s * s;
  const T p = (P[4] * s2 + (P[3] * s + P[2])) * s2 + (P[1] * s + P[0]);
  const T q = (Q[4] * s2 + (Q[3] * s + Q[2])) * s2 + (Q[1] * s + Q[0]);
  return y * p / q;
}

template <class T>
inline T silu(T x) {
  const T h = 0.5f * x;
  return h * tanh_fit(h) + h;
}

// d silu / dx = s + x s (1 - s), s = sigmoid(x) = (1 + tanh(x / 2)) / 2: fastops' SiLU VJP.
template <class T>
inline T silu_grad(T x) {
  const T s = 0.5f + 0.5f * tanh_fit(0.5f * x);
  return s + x * s * (1.f - s);
}

// Per-channel mean and 1/std of one image xn (P, C), each the value of the channel's group:
// pass 1 the group means, pass 2 the variances from squared deviations (no cancellation, like
// torch). `sums` is C floats of scratch.
inline void group_stats(const float* __restrict xn, int P, int C, int groups, float eps, float* __restrict sums,
                        float* __restrict means, float* __restrict rstds) {
  const int per_group = C / groups;
  const double count = double(P) * per_group;
  std::fill(sums, sums + C, 0.f);
  for (int p = 0; p < P; ++p) {
    const float* xp = xn + std::size_t(p) * C;
    for_lanes(C, [&](auto t, int c) {
      using T = decltype(t);
      st<T>(sums + c, ld<T>(sums + c) + ld<T>(xp + c));
    });
  }
  for (int g = 0; g < groups; ++g) {
    double s = 0;
    for (int c = g * per_group; c < (g + 1) * per_group; ++c) s += sums[c];
    std::fill(means + g * per_group, means + (g + 1) * per_group, float(s / count));
  }
  std::fill(sums, sums + C, 0.f);
  for (int p = 0; p < P; ++p) {
    const float* xp = xn + std::size_t(p) * C;
    for_lanes(C, [&](auto t, int c) {
      using T = decltype(t);
      const T d = ld<T>(xp + c) - ld<T>(means + c);
      st<T>(sums + c, ld<T>(sums + c) + d * d);
    });
  }
  for (int g = 0; g < groups; ++g) {
    double s = 0;
    for (int c = g * per_group; c < (g + 1) * per_group; ++c) s += sums[c];
    std::fill(rstds + g * per_group, rstds + (g + 1) * per_group, float(1.0 / std::sqrt(s / count + double(eps))));
  }
}

// The per-channel arrays of one image (C floats each, carved from 5 C floats of scratch): its group
// statistics (group_stats) folded with gamma and beta into y = x scale + shift.
struct ImageAffine {
  float *sums, *means, *rstds, *scale, *shift;
  ImageAffine(float* base, int C)
      : sums(base), means(base + C), rstds(base + 2 * C), scale(base + 3 * C), shift(base + 4 * C) {}
  void compute(const float* xn, const float* gamma, const float* beta, int P, int C, int groups, float eps) {
    group_stats(xn, P, C, groups, eps, sums, means, rstds);
    for (int c = 0; c < C; ++c) {
      scale[c] = gamma[c] * rstds[c];
      shift[c] = beta[c] - means[c] * scale[c];
    }
  }
};

// x, out (B, P, C) with P pixels; gamma, beta (C).
inline void group_norm(const float* x, const float* gamma, const float* beta, float* out, int B, int P, int C,
                       int groups, float eps, bool act) {
  thread_local std::vector<float> scratch;
  scratch.resize(std::size_t(5) * C);
  ImageAffine a(scratch.data(), C);
  for (int n = 0; n < B; ++n) {
    const float* xn = x + std::size_t(n) * P * C;
    float* on = out + std::size_t(n) * P * C;
    a.compute(xn, gamma, beta, P, C, groups, eps);
    // Pass 3: normalise, affine map, SiLU.
    for (int p = 0; p < P; ++p) {
      const float* xp = xn + std::size_t(p) * C;
      float* op = on + std::size_t(p) * C;
      for_lanes(C, [&](auto t, int c) {
        using T = decltype(t);
        const T y = ld<T>(xp + c) * ld<T>(a.scale + c) + ld<T>(a.shift + c);
        st<T>(op + c, act ? silu(y) : y);
      });
    }
  }
}

// The gradient of group_norm (+ SiLU): x, dz, dx (B, P, C); gamma, beta, dgamma, dbeta (C).
// With xhat = (x - mean) rstd, y = gamma xhat + beta and dy = dz silu'(y) (or dz):
//   dbeta = sum dy, dgamma = sum dy xhat (over images and pixels),
//   dx = rstd (gamma dy - (S1 + xhat S2) / N), S1, S2 = sums over the group of gamma dy and
//   gamma dy xhat, N = numbers per group.
// Per image: the statistics again (two passes), dy into dx with the per-channel sums (pass 3),
// then dx in place (pass 4), all from L2 cache.
inline void group_norm_backward(const float* x, const float* gamma, const float* beta, const float* dz, float* dx,
                                float* dgamma, float* dbeta, int B, int P, int C, int groups, float eps, bool act) {
  const int per_group = C / groups;
  const double count = double(P) * per_group;
  thread_local std::vector<float> scratch;
  thread_local std::vector<double> totals;
  scratch.resize(std::size_t(9) * C);
  totals.assign(std::size_t(2) * C, 0.0);
  ImageAffine a(scratch.data(), C);
  float* sum_dy = a.shift + C;
  float* sum_dy_xhat = sum_dy + C;
  float* slope = sum_dy_xhat + C;
  float* offset = slope + C;
  for (int n = 0; n < B; ++n) {
    const float* xn = x + std::size_t(n) * P * C;
    const float* dzn = dz + std::size_t(n) * P * C;
    float* dxn = dx + std::size_t(n) * P * C;
    a.compute(xn, gamma, beta, P, C, groups, eps);
    for (int c = 0; c < C; ++c) {
      sum_dy[c] = 0.f;
      sum_dy_xhat[c] = 0.f;
    }
    // Pass 3: dy (stored in dx) and its per-channel sums; sum dy xhat = rstd sum dy (x - mean).
    for (int p = 0; p < P; ++p) {
      const float* xp = xn + std::size_t(p) * C;
      const float* dzp = dzn + std::size_t(p) * C;
      float* dyp = dxn + std::size_t(p) * C;
      for_lanes(C, [&](auto t, int c) {
        using T = decltype(t);
        const T xv = ld<T>(xp + c), dzv = ld<T>(dzp + c);
        const T dy = act ? dzv * silu_grad(xv * ld<T>(a.scale + c) + ld<T>(a.shift + c)) : dzv;
        st<T>(dyp + c, dy);
        st<T>(sum_dy + c, ld<T>(sum_dy + c) + dy);
        st<T>(sum_dy_xhat + c, ld<T>(sum_dy_xhat + c) + dy * (xv - ld<T>(a.means + c)));
      });
    }
    // dx = gamma rstd dy + slope x + offset per channel: slope = -rstd^2 S2 / N,
    // offset = -rstd (S1 - rstd mean S2) / N.
    for (int g = 0; g < groups; ++g) {
      double s1 = 0, s2 = 0;
      for (int c = g * per_group; c < (g + 1) * per_group; ++c) {
        sum_dy_xhat[c] *= a.rstds[c];
        s1 += double(gamma[c]) * sum_dy[c];
        s2 += double(gamma[c]) * sum_dy_xhat[c];
      }
      for (int c = g * per_group; c < (g + 1) * per_group; ++c) {
        const double r = a.rstds[c];
        slope[c] = float(-r * r * s2 / count);
        offset[c] = float(-r * (s1 - r * double(a.means[c]) * s2) / count);
      }
    }
    for (int c = 0; c < C; ++c) {
      totals[c] += sum_dy_xhat[c];
      totals[C + c] += sum_dy[c];
    }
    // Pass 4: dx in place of dy.
    for (int p = 0; p < P; ++p) {
      const float* xp = xn + std::size_t(p) * C;
      float* dxp = dxn + std::size_t(p) * C;
      for_lanes(C, [&](auto t, int c) {
        using T = decltype(t);
        st<T>(dxp + c, ld<T>(a.scale + c) * ld<T>(dxp + c) + ld<T>(slope + c) * ld<T>(xp + c) + ld<T>(offset + c));
      });
    }
  }
  for (int c = 0; c < C; ++c) {
    dgamma[c] = float(totals[c]);
    dbeta[c] = float(totals[C + c]);
  }
}

}  // namespace hold_native
