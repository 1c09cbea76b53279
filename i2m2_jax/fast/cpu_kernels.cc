// Multi-threaded CPU kernels for LeNet blocks on large images: KxK 'same' convolution (K = 3 or
// 5, no bias) -> BatchNorm with batch statistics -> ReLU -> 2x2 max-pool, registered with XLA
// through its FFI.
//
// Why: on CPU, XLA runs these blocks' small-channel convolutions and loops on one thread, and
// much of the step waits for them. These kernels split the batch over XLA's intra-op thread pool
// and keep each example's convolution output in registers (no patch matrix, no full-resolution
// output in memory). Built on first use by i2m2_jax/fast/cpu_kernels.py; i2m2_jax/fast/ops.py
// uses its XLA implementation when they are not available.
//
// Layouts (row-major): x [B, Ci, H, W] (H, W even); kernel [K * K * Ci, C] (HWIO flattened);
// pooled outputs [B, C, H/2, W/2]. A 2x2 pooling window's elements are e = 2 * row + column.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One vector (vf, or vi for indices) of pooled columns: 16 lanes where the compiler targets
// AVX-512, else 8 (AVX2's 16 registers hold the 12 accumulators of Windows<K, 3> only at that
// width).
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

inline vf Load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf Splat(float s) { return vf{} + s; }
inline vi SplatI(int32_t s) { return vi{} + s; }
inline float Sum(vf v) {
  float s = 0;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// Runs f(0..n-1) on the calling thread and on XLA's intra-op pool. The caller takes items too and
// then waits only for items that another thread has claimed and is running, so a pool whose
// threads are all busy (or blocked in this function) cannot deadlock it.
struct ParallelJob {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  const std::function<void(int64_t)>* f = nullptr;
};

void Work(ParallelJob* job) {
  for (int64_t i; (i = job->next.fetch_add(1, std::memory_order_relaxed)) < job->n;) {
    (*job->f)(i);
    job->done.fetch_add(1, std::memory_order_release);
  }
}

void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& f) {
  auto job = std::make_shared<ParallelJob>();
  job->n = n;
  job->f = &f;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([job] { Work(job.get()); });
  }
  Work(job.get());
  while (job->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

template <int K>
struct Geometry {
  static constexpr int P = K / 2;  // 'same' padding
  int64_t batch, ci, h, w, c;      // input [batch, ci, h, w], c output channels
  int64_t h2, w2;                  // pooled size
  int64_t blocks;                  // vectors of kLanes pooled columns per row
  int64_t row;                     // floats per plane row
  int64_t plane;                   // floats per plane
  int64_t grad_row, grad_plane;    // the same for the padded planes of g_y (backward)

  Geometry(int64_t batch, int64_t ci, int64_t h, int64_t w, int64_t c)
      : batch(batch), ci(ci), h(h), w(w), c(c), h2(h / 2), w2(w / 2),
        blocks((w / 2 + kLanes - 1) / kLanes), row(blocks * kLanes + kLanes),
        plane((h + 2 * P) * row), grad_row(blocks * kLanes + kLanes),
        grad_plane((h / 2 + 2) * grad_row) {}

  // Lanes of block `mb` that are real pooled columns (the last block may be partial).
  int64_t Valid(int64_t mb) const { return std::min<int64_t>(kLanes, w2 - mb * kLanes); }
};

// floor(a / 2) for the small signed offsets below.
constexpr int Half(int a) { return a >= 0 ? a / 2 : -((1 - a) / 2); }

// One example's input, zero-padded by P pixels and each channel split into its even (plane 0)
// and odd (plane 1) padded columns: planes[ci][p][r][n] = xpad[ci][r][2n + p]. Output pixel
// (i, 2m + px) reads tap (dy, dx) at planes[ci][(px + dx) % 2][i + dy][m + (px + dx) / 2], so
// every load of kLanes pooled columns is contiguous.
template <int K>
void Planes(const float* x, const Geometry<K>& g, float* planes) {
  constexpr int P = Geometry<K>::P;
  std::fill(planes, planes + 2 * g.ci * g.plane, 0.0f);
  for (int64_t ci = 0; ci < g.ci; ++ci) {
    for (int64_t r = 0; r < g.h; ++r) {
      const float* xr = x + (ci * g.h + r) * g.w;
      float* base = planes + 2 * ci * g.plane + (r + P) * g.row;
      for (int64_t col = 0; col < g.w; ++col) {
        base[((col + P) & 1) * g.plane + ((col + P) >> 1)] = xr[col];
      }
    }
  }
}

// Convolution outputs of the four elements of the pooling windows of pooled row t, columns
// kLanes * mb + lane, output channels c0 .. c0 + G - 1: acc[e][c]. Each of the (K+1)^2 input
// vectors the windows read per input channel is loaded once.
template <int K, int G>
inline void Windows(const float* planes, const Geometry<K>& g, const float* kernel, int64_t c0,
                    int64_t t, int64_t mb, vf acc[4][G]) {
  for (int e = 0; e < 4; ++e)
    for (int c = 0; c < G; ++c) acc[e][c] = Splat(0.0f);
  for (int64_t ci = 0; ci < g.ci; ++ci) {
    const float* base = planes + 2 * ci * g.plane + 2 * t * g.row + mb * kLanes;
#pragma GCC unroll 6
    for (int u = 0; u < K + 1; ++u) {
#pragma GCC unroll 6
      for (int q = 0; q < K + 1; ++q) {
        const vf xv = Load(base + (q & 1) * g.plane + u * g.row + (q >> 1));
#pragma GCC unroll 2
        for (int py = 0; py < 2; ++py) {
#pragma GCC unroll 2
          for (int px = 0; px < 2; ++px) {
            const int dy = u - py, dx = q - px;
            if (dy < 0 || dy >= K || dx < 0 || dx >= K) continue;
            const float* k = kernel + ((dy * K + dx) * g.ci + ci) * g.c + c0;
#pragma GCC unroll 4
            for (int c = 0; c < G; ++c) acc[2 * py + px][c] += xv * Splat(k[c]);
          }
        }
      }
    }
  }
}

// Channel groups of up to 3: 12 accumulators stay in registers with AVX2's 16.
template <typename F>
inline void ForChannelGroups(int64_t c, F&& f) {
  int64_t c0 = 0;
  for (; c0 + 3 <= c; c0 += 3) f(std::integral_constant<int, 3>{}, c0);
  if (c - c0 == 2) f(std::integral_constant<int, 2>{}, c0);
  if (c - c0 == 1) f(std::integral_constant<int, 1>{}, c0);
}

// Per example: the selected element of each pooling window (its maximum, or minimum for channels
// whose BatchNorm scale is negative: BatchNorm is monotone per channel and ReLU commutes with
// max), the index of its first such element, and the sum and sum of squares of all convolution
// outputs per channel (for the batch statistics).
template <int K>
void ForwardExample(const float* x, const float* kernel, const float* scale,
                    const Geometry<K>& g, int64_t b, float* sel, int8_t* first, double* sums,
                    float* planes) {
  Planes(x + b * g.ci * g.h * g.w, g, planes);
  std::vector<vf> s1(g.c), s2(g.c);
  for (int64_t c = 0; c < g.c; ++c) sums[2 * c] = sums[2 * c + 1] = 0.0;
  for (int64_t t = 0; t < g.h2; ++t) {
    std::fill(s1.begin(), s1.end(), Splat(0.0f));
    std::fill(s2.begin(), s2.end(), Splat(0.0f));
    ForChannelGroups(g.c, [&](auto group, int64_t c0) {
      constexpr int G = decltype(group)::value;
      vf acc[4][G];
      for (int64_t mb = 0; mb < g.blocks; ++mb) {
        Windows<K, G>(planes, g, kernel, c0, t, mb, acc);
        const int64_t valid = g.Valid(mb);
        vf mask;
        for (int l = 0; l < kLanes; ++l) mask[l] = l < valid ? 1.0f : 0.0f;
        for (int c = 0; c < G; ++c) {
          const vf a0 = acc[0][c], a1 = acc[1][c], a2 = acc[2][c], a3 = acc[3][c];
          vf s;
          if (scale[c0 + c] >= 0) {
            const vf m01 = a0 > a1 ? a0 : a1, m23 = a2 > a3 ? a2 : a3;
            s = m01 > m23 ? m01 : m23;
          } else {
            const vf m01 = a0 < a1 ? a0 : a1, m23 = a2 < a3 ? a2 : a3;
            s = m01 < m23 ? m01 : m23;
          }
          vi f = a2 == s ? SplatI(2) : SplatI(3);
          f = a1 == s ? SplatI(1) : f;
          f = a0 == s ? SplatI(0) : f;
          s1[c0 + c] += ((a0 + a1) + (a2 + a3)) * mask;
          s2[c0 + c] += ((a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)) * mask;
          const int64_t out = ((b * g.c + c0 + c) * g.h2 + t) * g.w2 + mb * kLanes;
          for (int l = 0; l < valid; ++l) {
            sel[out + l] = s[l];
            first[out + l] = static_cast<int8_t>(f[l]);
          }
        }
      }
    });
    for (int64_t c = 0; c < g.c; ++c) {
      sums[2 * c] += Sum(s1[c]);
      sums[2 * c + 1] += Sum(s2[c]);
    }
  }
}

// The input gradient of pixels (2s + ry, 2(kLanes nb + lane) + rx), input channels
// ci0 .. ci0 + G - 1: acc[2 ry + rx][ci], from the zero-padded window planes of g_y
// (grad[c][e][1 + pooled row][1 + pooled column]).
template <int K, int G>
inline void InputGradWindows(const float* grad, const Geometry<K>& g, const float* kernel,
                             int64_t ci0, int64_t s, int64_t nb, vf acc[4][G]) {
  constexpr int P = Geometry<K>::P;
  for (int e = 0; e < 4; ++e)
    for (int c = 0; c < G; ++c) acc[e][c] = Splat(0.0f);
  for (int64_t co = 0; co < g.c; ++co) {
    const float* base = grad + 4 * co * g.grad_plane + (s + 1) * g.grad_row + nb * kLanes + 1;
    // Offsets a = ry + P - dy (rows) and b = rx + P - dx (columns) of g_y relative to 2s, 2n.
#pragma GCC unroll 6
    for (int ia = 0; ia < K + 1; ++ia) {
#pragma GCC unroll 6
      for (int ib = 0; ib < K + 1; ++ib) {
        const int a = ia + P - (K - 1), bo = ib + P - (K - 1);
        const vf gv = Load(base + (2 * (a & 1) + (bo & 1)) * g.grad_plane + Half(a) * g.grad_row +
                           Half(bo));
#pragma GCC unroll 2
        for (int ry = 0; ry < 2; ++ry) {
#pragma GCC unroll 2
          for (int rx = 0; rx < 2; ++rx) {
            const int dy = ry + P - a, dx = rx + P - bo;
            if (dy < 0 || dy >= K || dx < 0 || dx >= K) continue;
            const float* k = kernel + ((dy * K + dx) * g.ci + ci0) * g.c + co;
#pragma GCC unroll 4
            for (int c = 0; c < G; ++c) acc[2 * ry + rx][c] += gv * Splat(k[c * g.c]);
          }
        }
      }
    }
  }
}

// Per example: BatchNorm's input gradient g_y = a (g_z - c1 - (y - mean) c2) (coef rows a, c1,
// c2, mean; y recomputed; g_z the pooled gradient g_pre routed to each window's first selected
// element), then the kernel gradient (sum over pixels of g_y x(tap)) and, when d_x is given, the
// input gradient (g_y convolved with the flipped kernel).
template <int K>
void BackwardExample(const float* x, const float* kernel, const float* g_pre,
                     const int8_t* first, const float* coef, const Geometry<K>& g, int64_t b,
                     double* d_kernel, float* d_x, float* planes, float* grad) {
  Planes(x + b * g.ci * g.h * g.w, g, planes);
  const float* a = coef;
  const float* c1 = coef + g.c;
  const float* c2 = coef + 2 * g.c;
  const float* mean = coef + 3 * g.c;
  std::fill(grad, grad + 4 * g.c * g.grad_plane, 0.0f);
  for (int64_t i = 0; i < K * K * g.ci * g.c; ++i) d_kernel[i] = 0.0;
  for (int64_t t = 0; t < g.h2; ++t) {
    ForChannelGroups(g.c, [&](auto group, int64_t c0) {
      constexpr int G = decltype(group)::value;
      vf acc[4][G];
      for (int64_t mb = 0; mb < g.blocks; ++mb) {
        Windows<K, G>(planes, g, kernel, c0, t, mb, acc);
        const int64_t valid = g.Valid(mb);
        for (int c = 0; c < G; ++c) {
          const int64_t ch = c0 + c;
          const int64_t in = ((b * g.c + ch) * g.h2 + t) * g.w2 + mb * kLanes;
          vf gp = Splat(0.0f);
          vi fi = SplatI(-1);  // lanes past the row select nothing: g_y = 0 there
          for (int l = 0; l < valid; ++l) {
            gp[l] = g_pre[in + l];
            fi[l] = first[in + l];
          }
          for (int e = 0; e < 4; ++e) {
            const vf gz = fi == SplatI(e) ? gp : Splat(0.0f);
            vf gy = Splat(a[ch]) * (gz - Splat(c1[ch]) - (acc[e][c] - Splat(mean[ch])) *
                                                         Splat(c2[ch]));
            gy = fi >= SplatI(0) ? gy : Splat(0.0f);
            std::memcpy(grad + (4 * ch + e) * g.grad_plane + (t + 1) * g.grad_row +
                            mb * kLanes + 1, &gy, sizeof gy);
          }
        }
      }
    });
    // Kernel gradient of this row of windows, per output and input channel: the K*K taps'
    // partial sums stay in registers while the windows' input vectors stream past.
    for (int64_t ch = 0; ch < g.c; ++ch) {
      for (int64_t ci = 0; ci < g.ci; ++ci) {
        vf k[K * K];
        for (int i = 0; i < K * K; ++i) k[i] = Splat(0.0f);
        const float* base = planes + 2 * ci * g.plane + 2 * t * g.row;
        const float* gy_row = grad + 4 * ch * g.grad_plane + (t + 1) * g.grad_row + 1;
        for (int64_t mb = 0; mb < g.blocks; ++mb) {
          vf gye[4];
          for (int e = 0; e < 4; ++e) gye[e] = Load(gy_row + e * g.grad_plane + mb * kLanes);
#pragma GCC unroll 6
          for (int u = 0; u < K + 1; ++u) {
#pragma GCC unroll 6
            for (int q = 0; q < K + 1; ++q) {
              const vf xv = Load(base + (q & 1) * g.plane + u * g.row + (q >> 1) + mb * kLanes);
#pragma GCC unroll 2
              for (int py = 0; py < 2; ++py) {
#pragma GCC unroll 2
                for (int px = 0; px < 2; ++px) {
                  const int dy = u - py, dx = q - px;
                  if (dy < 0 || dy >= K || dx < 0 || dx >= K) continue;
                  k[dy * K + dx] += gye[2 * py + px] * xv;
                }
              }
            }
          }
        }
        for (int i = 0; i < K * K; ++i) d_kernel[(i * g.ci + ci) * g.c + ch] += Sum(k[i]);
      }
    }
  }
  if (d_x == nullptr) return;
  float* out = d_x + b * g.ci * g.h * g.w;
  for (int64_t s = 0; s < g.h2; ++s) {
    ForChannelGroups(g.ci, [&](auto group, int64_t ci0) {
      constexpr int G = decltype(group)::value;
      vf acc[4][G];
      for (int64_t nb = 0; nb < g.blocks; ++nb) {
        InputGradWindows<K, G>(grad, g, kernel, ci0, s, nb, acc);
        const int64_t valid = g.Valid(nb);
        for (int c = 0; c < G; ++c) {
          for (int ry = 0; ry < 2; ++ry) {
            float* row = out + ((ci0 + c) * g.h + 2 * s + ry) * g.w + 2 * nb * kLanes;
            for (int l = 0; l < valid; ++l) {
              row[2 * l] = acc[2 * ry][c][l];
              row[2 * l + 1] = acc[2 * ry + 1][c][l];
            }
          }
        }
      }
    });
  }
}

// Shapes: x [B, Ci, H, W] with even H, W; kernel [K * K * Ci, C] with K = 3 or 5. Returns K, or
// 0 with `error` set.
int KernelSize(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& kernel, int64_t c,
               ffi::Error& error) {
  auto xd = x.dimensions();
  auto kd = kernel.dimensions();
  if (xd.size() != 4 || xd[2] % 2 != 0 || xd[3] % 2 != 0) {
    error = ffi::Error::InvalidArgument("i2m2 conv_pool: x must be [B, Ci, H, W], H and W even");
    return 0;
  }
  for (int k : {3, 5}) {
    if (kd.size() == 2 && kd[0] == k * k * xd[1] && kd[1] == c) return k;
  }
  error = ffi::Error::InvalidArgument("i2m2 conv_pool: kernel must be [K * K * Ci, C], K = 3 or 5");
  return 0;
}

template <int K>
void Forward(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x,
             const ffi::Buffer<ffi::F32>& kernel, const ffi::Buffer<ffi::F32>& scale,
             float* sel, int8_t* first, float* moments) {
  auto xd = x.dimensions();
  const Geometry<K> g(xd[0], xd[1], xd[2], xd[3], scale.element_count());
  const int64_t c = g.c;
  std::vector<double> sums(g.batch * 2 * c);
  std::function<void(int64_t)> example = [&](int64_t b) {
    thread_local std::vector<float> planes;
    planes.resize(2 * g.ci * g.plane);
    ForwardExample<K>(x.typed_data(), kernel.typed_data(), scale.typed_data(), g, b, sel, first,
                      sums.data() + b * 2 * c, planes.data());
  };
  ParallelFor(pool, g.batch, example);
  // Batch mean and biased variance, summed in example order (the same on any thread count).
  const double count = static_cast<double>(g.batch * g.h * g.w);
  for (int64_t ch = 0; ch < c; ++ch) {
    double s1 = 0, s2 = 0;
    for (int64_t b = 0; b < g.batch; ++b) {
      s1 += sums[(b * c + ch) * 2];
      s2 += sums[(b * c + ch) * 2 + 1];
    }
    const double mean = s1 / count;
    moments[ch] = static_cast<float>(mean);
    moments[c + ch] = static_cast<float>(std::max(0.0, s2 / count - mean * mean));
  }
}

template <int K>
void Backward(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x,
              const ffi::Buffer<ffi::F32>& kernel, const ffi::Buffer<ffi::F32>& g_pre,
              const ffi::Buffer<ffi::S8>& first, const ffi::Buffer<ffi::F32>& coef,
              float* d_kernel, float* d_x) {
  auto xd = x.dimensions();
  const Geometry<K> g(xd[0], xd[1], xd[2], xd[3], coef.element_count() / 4);
  const int64_t taps = K * K * g.ci * g.c;
  std::vector<double> partial(g.batch * taps);
  std::function<void(int64_t)> example = [&](int64_t b) {
    thread_local std::vector<float> planes, grad;
    planes.resize(2 * g.ci * g.plane);
    grad.resize(4 * g.c * g.grad_plane);
    BackwardExample<K>(x.typed_data(), kernel.typed_data(), g_pre.typed_data(),
                       first.typed_data(), coef.typed_data(), g, b, partial.data() + b * taps,
                       d_x, planes.data(), grad.data());
  };
  ParallelFor(pool, g.batch, example);
  for (int64_t i = 0; i < taps; ++i) {
    double s = 0;
    for (int64_t b = 0; b < g.batch; ++b) s += partial[b * taps + i];
    d_kernel[i] = static_cast<float>(s);
  }
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> scale,
                       ffi::ResultBuffer<ffi::F32> sel, ffi::ResultBuffer<ffi::S8> first,
                       ffi::ResultBuffer<ffi::F32> moments) {
  ffi::Error error = ffi::Error::Success();
  const int k = KernelSize(x, kernel, scale.element_count(), error);
  if (k == 0) return error;
  auto run = k == 3 ? Forward<3> : Forward<5>;
  run(pool, x, kernel, scale, sel->typed_data(), first->typed_data(), moments->typed_data());
  return ffi::Error::Success();
}

ffi::Error CheckGradShapes(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& g_pre,
                           const ffi::Buffer<ffi::S8>& first, int64_t c) {
  auto xd = x.dimensions();
  if (g_pre.element_count() != static_cast<size_t>(xd[0] * c * (xd[2] / 2) * (xd[3] / 2)) ||
      first.element_count() != g_pre.element_count()) {
    return ffi::Error::InvalidArgument(
        "i2m2 conv_pool backward: g_pre and first must be [B, C, H/2, W/2]");
  }
  return ffi::Error::Success();
}

// The backward handlers share everything but whether the input gradient is written (d_x).
ffi::Error BackwardImpl(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x,
                        const ffi::Buffer<ffi::F32>& kernel, const ffi::Buffer<ffi::F32>& g_pre,
                        const ffi::Buffer<ffi::S8>& first, const ffi::Buffer<ffi::F32>& coef,
                        float* d_kernel, float* d_x) {
  const int64_t c = coef.element_count() / 4;
  ffi::Error error = ffi::Error::Success();
  const int k = KernelSize(x, kernel, c, error);
  if (k == 0) return error;
  if (auto shapes = CheckGradShapes(x, g_pre, first, c); shapes.failure()) return shapes;
  auto run = k == 3 ? Backward<3> : Backward<5>;
  run(pool, x, kernel, g_pre, first, coef, d_kernel, d_x);
  return ffi::Error::Success();
}

ffi::Error KernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> g_pre,
                          ffi::Buffer<ffi::S8> first, ffi::Buffer<ffi::F32> coef,
                          ffi::ResultBuffer<ffi::F32> d_kernel) {
  return BackwardImpl(pool, x, kernel, g_pre, first, coef, d_kernel->typed_data(), nullptr);
}

ffi::Error GradsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                     ffi::Buffer<ffi::F32> g_pre, ffi::Buffer<ffi::S8> first,
                     ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> d_kernel,
                     ffi::ResultBuffer<ffi::F32> d_x) {
  return BackwardImpl(pool, x, kernel, g_pre, first, coef, d_kernel->typed_data(),
                      d_x->typed_data());
}

// The backward handlers' operands: x, kernel, g_pre, first, coef.
auto BackwardBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S8>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(I2m2ConvPoolForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(I2m2ConvPoolKernelGrad, KernelGradImpl,
                              BackwardBinding().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(I2m2ConvPoolGrads, GradsImpl,
                              BackwardBinding()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
