// Direct 3x3 convolution, stride 1 or 2, zero padding 1, channels last (NHWC), float32.
//
// Why not im2col + GEMM: with 32-64 output channels the GEMM is skinny and BLAS reaches about
// half of the core's FMA rate; here the output tile stays in registers instead. A tile is NP
// neighbouring pixels of one row times 2 vectors of output channels (NP = 14 with AVX-512:
// 28 accumulators of the 32 registers). For each of the 9 taps and each input channel, the
// tile loads 2 weight vectors and broadcasts one input value per pixel into 2 FMAs. The input
// image is copied once into a zero-framed scratch buffer so the taps need no bounds checks.
// Built once per instruction set (hold_mlx/native.py picks the build at run time), so the
// vector width below is the build's: 16 lanes for AVX-512, 8 for AVX2, 4 for SSE2 / NEON.
// Rows are processed in bands sized so that a band of the framed input and the weights stay in
// the L2 cache the machine reports while every output-channel block passes over the band.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_cache.h"
#include "simd.h"

namespace hold_native {

#if defined(__AVX512F__)
constexpr int kMaxPixels = 14;  // 32 zmm registers
#else
constexpr int kMaxPixels = 6;  // 16 ymm / xmm registers (32 NEON registers: room to spare)
#endif

// f(std::integral_constant<int, n>{}) for a runtime 0 < n < kMaxPixels: the tail tiles, whose
// sizes must be compile-time constants for their accumulators to live in registers.
template <int N = 1, class F>
inline void with_tile_size(int n, F&& f) {
  if constexpr (N < kMaxPixels) {
    if (n == N)
      f(std::integral_constant<int, N>{});
    else
      with_tile_size<N + 1>(n, std::forward<F>(f));
  }
}

// out[p, :] = bias + sum over taps (dy, dx) and channels c of src[dy, stride p + dx, c] * w[dy, dx, c, :]
// for NP pixels p and NV * kLanes output channels. `src` is the framed input at the tile's
// first pixel; `pixel_step` = stride * C floats between the tile's pixels; `w` is (9, C, o_pitch) with this
// tile's channels first (o_pitch = the block); `o_valid` channels are written to `dst` (pixel pitch
// `o_pitch_out`). A stride only changes which input values are broadcast, not the register tiling.
// K is the kernel size: 3, or 2 for the sub-pixel kernels of upsample_conv3x3 (w is then (4, C, o_pitch)).
template <int NP, int NV, int K = 3>
inline void conv_tile(const float* __restrict src, int C, std::ptrdiff_t pixel_step, std::ptrdiff_t row_pitch,
                      const float* __restrict w, int o_pitch, const float* __restrict bias, float* __restrict dst,
                      int o_valid, int o_pitch_out) {
  vec acc[NP][NV];
  for (int v = 0; v < NV; ++v) {
    const vec b = load(bias + v * kLanes);
    for (int p = 0; p < NP; ++p) acc[p][v] = b;
  }
  for (int dy = 0; dy < K; ++dy)
    for (int dx = 0; dx < K; ++dx) {
      const float* s = src + dy * row_pitch + dx * C;
      const float* wt = w + (dy * K + dx) * C * o_pitch;
      for (int c = 0; c < C; ++c) {
        vec wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = load(wt + c * o_pitch + v * kLanes);
        for (int p = 0; p < NP; ++p) {
          const float x = s[p * pixel_step + c];
          for (int v = 0; v < NV; ++v) acc[p][v] += x * wv[v];
        }
      }
    }
  for (int p = 0; p < NP; ++p) {
    if (o_valid == NV * kLanes) {
      for (int v = 0; v < NV; ++v) store(dst + p * o_pitch_out + v * kLanes, acc[p][v]);
    } else {
      float lanes[NV * kLanes];
      for (int v = 0; v < NV; ++v) store(lanes + v * kLanes, acc[p][v]);
      std::memcpy(dst + p * o_pitch_out, lanes, o_valid * sizeof(float));
    }
  }
}

// One output row of W pixels: full tiles of kMaxPixels, then one shorter tile for the rest.
template <int NV, int K = 3>
inline void conv_row(const float* src, int C, std::ptrdiff_t pixel_step, std::ptrdiff_t row_pitch, const float* w,
                     int o_pitch, const float* bias, float* dst, int o_valid, int o_pitch_out, int W) {
  int x = 0;
  for (; x + kMaxPixels <= W; x += kMaxPixels)
    conv_tile<kMaxPixels, NV, K>(src + x * pixel_step, C, pixel_step, row_pitch, w, o_pitch, bias,
                                 dst + x * o_pitch_out, o_valid, o_pitch_out);
  with_tile_size(W - x, [&](auto n) {
    conv_tile<decltype(n)::value, NV, K>(src + x * pixel_step, C, pixel_step, row_pitch, w, o_pitch, bias,
                                         dst + x * o_pitch_out, o_valid, o_pitch_out);
  });
}

// Output rows per band: the band's framed input rows (band + 2 of them) plus all the weights in
// half the L2 cache (the other half for the output rows and whatever else runs), at least one.
inline int conv_band_rows(int H, std::ptrdiff_t row_pitch, std::size_t weight_floats) {
  const std::size_t budget = cache_sizes().l2 / 2 / sizeof(float);
  const std::size_t rows = budget > weight_floats ? (budget - weight_floats) / std::size_t(row_pitch) : 0;
  return std::max(1, std::min(H, int(std::min<std::size_t>(rows, std::size_t(H) + 2)) - 2));
}

// x (B, H, W, C), weight (O, 3, 3, C) (MLX's layout), bias (O), out (B, H / stride, W / stride, O); all
// contiguous. stride 1 or 2 (2: H and W even, output pixel (y, x) centred on input pixel (2y, 2x)).
inline void conv3x3(const float* x, const float* weight, const float* bias, float* out, int B, int H, int W,
                    int C, int O, int stride = 1) {
  constexpr int kBlock = 2 * kLanes;  // output channels per pass over an image
  const int o_pitch = (O + kBlock - 1) / kBlock * kBlock;
  // Weights to (O block, tap, C, kBlock) with O zero-padded to whole blocks: a tile streams its
  // block's weights contiguously. Bias likewise padded.
  thread_local std::vector<float> w, b, framed;
  w.assign(std::size_t(9) * C * o_pitch, 0.f);
  b.assign(o_pitch, 0.f);
  for (int o = 0; o < O; ++o) {
    float* wb = &w[std::size_t(o / kBlock) * 9 * C * kBlock + o % kBlock];
    for (int t = 0; t < 9; ++t)
      for (int c = 0; c < C; ++c) wb[(std::size_t(t) * C + c) * kBlock] = weight[(std::size_t(o) * 9 + t) * C + c];
    b[o] = bias[o];
  }
  const int Wf = W + 2;
  const std::ptrdiff_t row_pitch = std::ptrdiff_t(Wf) * C;
  framed.assign(std::size_t(H + 2) * row_pitch, 0.f);  // the frame stays zero; the inside is overwritten
  const int Ho = H / stride, Wo = W / stride;
  const std::ptrdiff_t pixel_step = std::ptrdiff_t(stride) * C;
  // an output row reads `stride` times the input rows: budget the band by that pitch
  const int band = conv_band_rows(Ho, stride * row_pitch, std::size_t(9) * C * o_pitch);
  for (int n = 0; n < B; ++n) {
    const float* xn = x + std::size_t(n) * H * W * C;
    for (int y = 0; y < H; ++y)
      std::memcpy(&framed[(y + 1) * row_pitch + C], xn + std::size_t(y) * W * C, std::size_t(W) * C * sizeof(float));
    float* on = out + std::size_t(n) * Ho * Wo * O;
    for (int y0 = 0; y0 < Ho; y0 += band) {
      const int y1 = std::min(Ho, y0 + band);
      for (int o0 = 0; o0 < O; o0 += kBlock) {
        const int o_valid = std::min(kBlock, O - o0);
        for (int y = y0; y < y1; ++y) {
          const float* s = &framed[std::ptrdiff_t(stride) * y * row_pitch];
          float* d = on + std::size_t(y) * Wo * O + o0;
          const float* wb = w.data() + std::size_t(o0) * 9 * C;  // block o0 / kBlock
          if (o_valid > kLanes)
            conv_row<2>(s, C, pixel_step, row_pitch, wb, kBlock, b.data() + o0, d, o_valid, O, Wo);
          else
            conv_row<1>(s, C, pixel_step, row_pitch, wb, kBlock, b.data() + o0, d, o_valid, O, Wo);
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------- upsampling convolution

// conv3x3 of the nearest-neighbour 2x upsampling of x, without the upsampled image: output pixel
// (2i + py, 2j + px) sees input rows i - 1 + py .. i + py and columns likewise, so each of the four
// output parities is a 2x2 convolution of x with taps summed from the 3x3 kernel (py = 0: W0 on
// row i - 1, W1 + W2 on row i; py = 1: W0 + W1 on row i, W2 on row i + 1; columns the same):
// 16 instead of 36 multiply-adds per input pixel and output channel, and no 4x image to write.
// x (B, H, W, C), weight (O, 3, 3, C), bias (O), out (B, 2H, 2W, O); all contiguous.
inline void upsample_conv3x3(const float* x, const float* weight, const float* bias, float* out, int B, int H,
                             int W, int C, int O) {
  constexpr int kBlock = 2 * kLanes;
  const int o_pitch = (O + kBlock - 1) / kBlock * kBlock;
  const std::size_t parity_floats = std::size_t(4) * C * o_pitch;  // one parity: (O block, 2x2 tap, C, kBlock)
  thread_local std::vector<float> w, b, framed;
  w.assign(4 * parity_floats, 0.f);
  b.assign(o_pitch, 0.f);
  // which 3x3 rows (columns) feed 2x2 tap a of parity p: p = 0: {0}, {1, 2}; p = 1: {0, 1}, {2}
  const int first[2][2] = {{0, 1}, {0, 2}}, last[2][2] = {{0, 2}, {1, 2}};
  for (int py = 0; py < 2; ++py)
    for (int px = 0; px < 2; ++px)
      for (int a = 0; a < 2; ++a)
        for (int bb = 0; bb < 2; ++bb)
          for (int o = 0; o < O; ++o) {
            float* wb = &w[(py * 2 + px) * parity_floats + std::size_t(o / kBlock) * 4 * C * kBlock + o % kBlock];
            for (int c = 0; c < C; ++c) {
              float sum = 0.f;
              for (int dy = first[py][a]; dy <= last[py][a]; ++dy)
                for (int dx = first[px][bb]; dx <= last[px][bb]; ++dx) sum += weight[((std::size_t(o) * 3 + dy) * 3 + dx) * C + c];
              wb[(std::size_t(a * 2 + bb) * C + c) * kBlock] = sum;
            }
          }
  for (int o = 0; o < O; ++o) b[o] = bias[o];
  const int Wf = W + 2;
  const std::ptrdiff_t row_pitch = std::ptrdiff_t(Wf) * C;
  framed.assign(std::size_t(H + 2) * row_pitch, 0.f);
  const std::ptrdiff_t out_row = std::ptrdiff_t(2) * W * O;  // floats per output row
  for (int n = 0; n < B; ++n) {
    const float* xn = x + std::size_t(n) * H * W * C;
    for (int y = 0; y < H; ++y)
      std::memcpy(&framed[(y + 1) * row_pitch + C], xn + std::size_t(y) * W * C, std::size_t(W) * C * sizeof(float));
    float* on = out + std::size_t(n) * 4 * H * W * O;
    for (int o0 = 0; o0 < O; o0 += kBlock) {
      const int o_valid = std::min(kBlock, O - o0);
      for (int y = 0; y < H; ++y)
        for (int py = 0; py < 2; ++py)
          for (int px = 0; px < 2; ++px) {
            // parity (py, px) reads framed rows y + py, y + py + 1 and columns j + px, j + px + 1
            const float* s = &framed[(y + py) * row_pitch + px * C];
            float* d = on + (2 * y + py) * out_row + std::ptrdiff_t(px) * O + o0;
            const float* wb = w.data() + (py * 2 + px) * parity_floats + std::size_t(o0) * 4 * C;
            if (o_valid > kLanes)
              conv_row<2, 2>(s, C, C, row_pitch, wb, kBlock, b.data() + o0, d, o_valid, 2 * O, W);
            else
              conv_row<1, 2>(s, C, C, row_pitch, wb, kBlock, b.data() + o0, d, o_valid, 2 * O, W);
          }
    }
  }
}

// ----------------------------------------------------------------------------- weight gradient

// acc[i][v] = sum over the P pixels p of src[p, i] * g[p, v * kLanes ...]: NC input channels
// times NV vectors of output channels, accumulated in registers over a whole image.
template <int NC, int NV>
inline void weight_grad_tile(const float* __restrict src, int C, int W, std::ptrdiff_t row_pitch,
                             const float* __restrict g, int O, int H, float* __restrict dw, int o_pitch) {
  vec acc[NC][NV] = {};
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) {
      const float* s = src + y * row_pitch + x * C;
      const float* gp = g + (std::size_t(y) * W + x) * O;
      vec gv[NV];
      for (int v = 0; v < NV; ++v) gv[v] = load(gp + v * kLanes);
      for (int i = 0; i < NC; ++i) {
        const float xi = s[i];
        for (int v = 0; v < NV; ++v) acc[i][v] += xi * gv[v];
      }
    }
  for (int i = 0; i < NC; ++i)
    for (int v = 0; v < NV; ++v) store(dw + i * o_pitch + v * kLanes, load(dw + i * o_pitch + v * kLanes) + acc[i][v]);
}

template <int NV>
inline void weight_grad_channels(const float* src, int C, int W, std::ptrdiff_t row_pitch, const float* g, int O,
                                 int H, float* dw, int o_pitch) {
  int c = 0;
  for (; c + kMaxPixels <= C; c += kMaxPixels)
    weight_grad_tile<kMaxPixels, NV>(src + c, C, W, row_pitch, g, O, H, dw + c * o_pitch, o_pitch);
  with_tile_size(C - c, [&](auto n) {
    weight_grad_tile<decltype(n)::value, NV>(src + c, C, W, row_pitch, g, O, H, dw + c * o_pitch, o_pitch);
  });
}

// The gradient of conv3x3's weight: x (B, H, W, C), g = dL/dout (B, H, W, O) with O a multiple
// of kLanes, dw (O, 3, 3, C). dw[o, dy, dx, c] = sum over pixels of g[p, o] * x[p + (dy-1, dx-1), c].
// The same register tiling as the forward pass with the roles swapped: a tile holds input
// channels x output channels and the reduction runs over one image's pixels.
inline void conv3x3_weight_grad(const float* x, const float* g, float* dw, int B, int H, int W, int C, int O) {
  constexpr int kBlock = 2 * kLanes;
  const int o_pitch = O;  // O is a multiple of kLanes: no padding needed
  thread_local std::vector<float> acc, framed;
  acc.assign(std::size_t(9) * C * o_pitch, 0.f);  // (tap, C, O)
  const int Wf = W + 2;
  const std::ptrdiff_t row_pitch = std::ptrdiff_t(Wf) * C;
  framed.assign(std::size_t(H + 2) * row_pitch, 0.f);
  for (int n = 0; n < B; ++n) {
    const float* xn = x + std::size_t(n) * H * W * C;
    for (int y = 0; y < H; ++y)
      std::memcpy(&framed[(y + 1) * row_pitch + C], xn + std::size_t(y) * W * C, std::size_t(W) * C * sizeof(float));
    const float* gn = g + std::size_t(n) * H * W * O;
    for (int t = 0; t < 9; ++t) {
      const float* src = &framed[(t / 3) * row_pitch + (t % 3) * C];
      for (int o0 = 0; o0 < O; o0 += kBlock) {
        float* d = &acc[std::size_t(t) * C * o_pitch + o0];
        if (O - o0 >= kBlock)
          weight_grad_channels<2>(src, C, W, row_pitch, gn + o0, O, H, d, o_pitch);
        else
          weight_grad_channels<1>(src, C, W, row_pitch, gn + o0, O, H, d, o_pitch);
      }
    }
  }
  for (int o = 0; o < O; ++o)
    for (int t = 0; t < 9; ++t)
      for (int c = 0; c < C; ++c) dw[(std::size_t(o) * 9 + t) * C + c] = acc[(std::size_t(t) * C + c) * o_pitch + o];
}

}  // namespace hold_native
