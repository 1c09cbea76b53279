// Multi-threaded CPU kernels for the first LeNet block (5x5 'same' convolution with one input
// channel -> BatchNorm -> ReLU -> 2x2 max-pool), registered with XLA through its FFI.
//
// Why: on CPU, XLA runs this block's loops and library calls on one thread, and everything else
// of the step waits for it. These kernels split the batch over XLA's intra-op thread pool and
// keep each example's convolution output in registers (no patch matrix, no full-resolution image
// in memory). Built on first use by i2m2_jax/cpu_kernels.py; fast_models.py falls back to its XLA
// implementation when they are not available.
//
// Layouts (row-major): x [B, H, W]; kernel [25, C] (HWIO of the 5x5x1xC kernel); pooled outputs
// [B, C, H/2, W/2]. A 2x2 pooling window's elements are numbered e = 2 * row + column.

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

constexpr int kLanes = 8;
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 Load(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline v8 Splat(float s) { return v8{s, s, s, s, s, s, s, s}; }
inline v8i SplatI(int32_t s) { return v8i{s, s, s, s, s, s, s, s}; }
inline float Sum(v8 v) {
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

struct Geometry {
  int64_t batch, h, w, c;  // input [batch, h, w], c output channels
  int64_t h2, w2;          // pooled size
  int64_t blocks;          // vectors of kLanes pooled columns per row
  int64_t row;             // floats per plane row
  int64_t plane;           // floats per plane

  Geometry(int64_t batch, int64_t h, int64_t w, int64_t c)
      : batch(batch), h(h), w(w), c(c), h2(h / 2), w2(w / 2),
        blocks((w / 2 + kLanes - 1) / kLanes),
        row(blocks * kLanes + kLanes), plane((h + 4) * row) {}

  // Lanes of block `mb` that are real pooled columns (the last block may be partial).
  int64_t Valid(int64_t mb) const { return std::min<int64_t>(kLanes, w2 - mb * kLanes); }
};

// The example's input zero-padded by 2 pixels (the 5x5 kernel's 'same') and split into its even
// (plane 0) and odd (plane 1) padded columns: planes[p][r][n] = xpad[r][2n + p]. Output pixel
// (i, 2m + px) reads tap (dy, dx) at planes[(px + dx) % 2][i + dy][m + (px + dx) / 2], so every
// load of kLanes pooled columns is contiguous.
void Planes(const float* x, const Geometry& g, float* planes) {
  std::fill(planes, planes + 2 * g.plane, 0.0f);
  for (int64_t r = 0; r < g.h; ++r) {
    const float* xr = x + r * g.w;
    float* p0 = planes + (r + 2) * g.row;
    float* p1 = p0 + g.plane;
    for (int64_t n = 0; n < g.w2; ++n) {
      p0[n + 1] = xr[2 * n];
      p1[n + 1] = xr[2 * n + 1];
    }
  }
}

// Convolution outputs of the four elements of the pooling windows of pooled row t, columns
// kLanes * mb + lane, channels c0 .. c0 + G - 1: acc[e][c]. Each of the 6x6 input vectors the
// windows read is loaded once.
template <int G>
inline void Windows(const float* planes, const Geometry& g, const float* kernel, int64_t c0,
                    int64_t t, int64_t mb, v8 acc[4][G]) {
  for (int e = 0; e < 4; ++e)
    for (int c = 0; c < G; ++c) acc[e][c] = Splat(0.0f);
  const float* base = planes + 2 * t * g.row + mb * kLanes;
#pragma GCC unroll 6
  for (int u = 0; u < 6; ++u) {
#pragma GCC unroll 6
    for (int q = 0; q < 6; ++q) {
      const v8 xv = Load(base + (q & 1) * g.plane + u * g.row + (q >> 1));
#pragma GCC unroll 2
      for (int py = 0; py < 2; ++py) {
#pragma GCC unroll 2
        for (int px = 0; px < 2; ++px) {
          const int dy = u - py, dx = q - px;
          if (dy < 0 || dy > 4 || dx < 0 || dx > 4) continue;
          const float* k = kernel + (dy * 5 + dx) * g.c + c0;
#pragma GCC unroll 4
          for (int c = 0; c < G; ++c) acc[2 * py + px][c] += xv * Splat(k[c]);
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
void StemForwardExample(const float* x, const float* kernel, const float* scale,
                        const Geometry& g, int64_t b, float* sel, int8_t* first,
                        double* sums, float* planes) {
  Planes(x + b * g.h * g.w, g, planes);
  std::vector<v8> s1(g.c), s2(g.c);
  for (int64_t c = 0; c < g.c; ++c) sums[2 * c] = sums[2 * c + 1] = 0.0;
  for (int64_t t = 0; t < g.h2; ++t) {
    std::fill(s1.begin(), s1.end(), Splat(0.0f));
    std::fill(s2.begin(), s2.end(), Splat(0.0f));
    ForChannelGroups(g.c, [&](auto group, int64_t c0) {
      constexpr int G = decltype(group)::value;
      v8 acc[4][G];
      for (int64_t mb = 0; mb < g.blocks; ++mb) {
        Windows<G>(planes, g, kernel, c0, t, mb, acc);
        const int64_t valid = g.Valid(mb);
        v8 mask;
        for (int l = 0; l < kLanes; ++l) mask[l] = l < valid ? 1.0f : 0.0f;
        for (int c = 0; c < G; ++c) {
          const v8 a0 = acc[0][c], a1 = acc[1][c], a2 = acc[2][c], a3 = acc[3][c];
          v8 s;
          if (scale[c0 + c] >= 0) {
            const v8 m01 = a0 > a1 ? a0 : a1, m23 = a2 > a3 ? a2 : a3;
            s = m01 > m23 ? m01 : m23;
          } else {
            const v8 m01 = a0 < a1 ? a0 : a1, m23 = a2 < a3 ? a2 : a3;
            s = m01 < m23 ? m01 : m23;
          }
          v8i f = a2 == s ? SplatI(2) : SplatI(3);
          f = a1 == s ? SplatI(1) : f;
          f = a0 == s ? SplatI(0) : f;
          const v8 total = (a0 + a1) + (a2 + a3);
          const v8 squares = (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3);
          s1[c0 + c] += total * mask;
          s2[c0 + c] += squares * mask;
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

// Per example: the kernel gradient sum over pixels of g_y * x(tap), with
// g_y = a (g_z - c1 - (y - mean) c2) BatchNorm's input gradient (coef rows a, c1, c2, mean) and
// g_z the pooled gradient g_pre routed to each window's first selected element.
void StemBackwardExample(const float* x, const float* kernel, const float* g_pre,
                         const int8_t* first, const float* coef, const Geometry& g, int64_t b,
                         double* d_kernel, float* planes, float* gy) {
  Planes(x + b * g.h * g.w, g, planes);
  const float* a = coef;
  const float* c1 = coef + g.c;
  const float* c2 = coef + 2 * g.c;
  const float* mean = coef + 3 * g.c;
  const int64_t gy_channel = 4 * g.blocks * kLanes;  // gy[c][e][column]
  for (int64_t i = 0; i < 25 * g.c; ++i) d_kernel[i] = 0.0;
  for (int64_t t = 0; t < g.h2; ++t) {
    ForChannelGroups(g.c, [&](auto group, int64_t c0) {
      constexpr int G = decltype(group)::value;
      v8 acc[4][G];
      for (int64_t mb = 0; mb < g.blocks; ++mb) {
        Windows<G>(planes, g, kernel, c0, t, mb, acc);
        const int64_t valid = g.Valid(mb);
        for (int c = 0; c < G; ++c) {
          const int64_t ch = c0 + c;
          const int64_t in = ((b * g.c + ch) * g.h2 + t) * g.w2 + mb * kLanes;
          v8 gp = Splat(0.0f);
          v8i fi = SplatI(-1);  // lanes past the row select nothing: g_y = 0 there
          for (int l = 0; l < valid; ++l) {
            gp[l] = g_pre[in + l];
            fi[l] = first[in + l];
          }
          for (int e = 0; e < 4; ++e) {
            const v8 gz = fi == SplatI(e) ? gp : Splat(0.0f);
            v8 gy_e = Splat(a[ch]) * (gz - Splat(c1[ch]) - (acc[e][c] - Splat(mean[ch])) *
                                                             Splat(c2[ch]));
            gy_e = fi >= SplatI(0) ? gy_e : Splat(0.0f);
            std::memcpy(gy + ch * gy_channel + (e * g.blocks + mb) * kLanes, &gy_e, sizeof gy_e);
          }
        }
      }
    });
    // Kernel gradient of this row of windows, one channel at a time: the 25 taps' partial sums
    // stay in registers while the windows' input vectors stream past.
    for (int64_t ch = 0; ch < g.c; ++ch) {
      v8 k[25];
      for (int i = 0; i < 25; ++i) k[i] = Splat(0.0f);
      for (int64_t mb = 0; mb < g.blocks; ++mb) {
        v8 gye[4];
        for (int e = 0; e < 4; ++e) gye[e] = Load(gy + ch * gy_channel + (e * g.blocks + mb) * kLanes);
        const float* base = planes + 2 * t * g.row + mb * kLanes;
#pragma GCC unroll 6
        for (int u = 0; u < 6; ++u) {
#pragma GCC unroll 6
          for (int q = 0; q < 6; ++q) {
            const v8 xv = Load(base + (q & 1) * g.plane + u * g.row + (q >> 1));
#pragma GCC unroll 2
            for (int py = 0; py < 2; ++py) {
#pragma GCC unroll 2
              for (int px = 0; px < 2; ++px) {
                const int dy = u - py, dx = q - px;
                if (dy < 0 || dy > 4 || dx < 0 || dx > 4) continue;
                k[dy * 5 + dx] += gye[2 * py + px] * xv;
              }
            }
          }
        }
      }
      for (int i = 0; i < 25; ++i) d_kernel[i * g.c + ch] += Sum(k[i]);
    }
  }
}

ffi::Error CheckStemShapes(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& kernel,
                           int64_t c) {
  auto xd = x.dimensions();
  auto kd = kernel.dimensions();
  if (xd.size() != 3 || xd[1] % 2 != 0 || xd[2] % 2 != 0) {
    return ffi::Error::InvalidArgument("i2m2 stem: x must be [B, H, W] with even H and W");
  }
  if (kd.size() != 2 || kd[0] != 25 || kd[1] != c) {
    return ffi::Error::InvalidArgument("i2m2 stem: kernel must be [25, C]");
  }
  return ffi::Error::Success();
}

ffi::Error StemForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> scale,
                           ffi::ResultBuffer<ffi::F32> sel, ffi::ResultBuffer<ffi::S8> first,
                           ffi::ResultBuffer<ffi::F32> moments) {
  const int64_t c = scale.element_count();
  if (auto error = CheckStemShapes(x, kernel, c); error.failure()) return error;
  auto xd = x.dimensions();
  const Geometry g(xd[0], xd[1], xd[2], c);
  std::vector<double> sums(g.batch * 2 * c);
  std::function<void(int64_t)> example = [&](int64_t b) {
    thread_local std::vector<float> planes;
    planes.resize(2 * g.plane);
    StemForwardExample(x.typed_data(), kernel.typed_data(), scale.typed_data(), g, b,
                       sel->typed_data(), first->typed_data(), sums.data() + b * 2 * c,
                       planes.data());
  };
  ParallelFor(pool, g.batch, example);
  // Batch mean and biased variance, summed in example order (the same result on any thread count).
  const double count = static_cast<double>(g.batch * g.h * g.w);
  float* out = moments->typed_data();
  for (int64_t ch = 0; ch < c; ++ch) {
    double s1 = 0, s2 = 0;
    for (int64_t b = 0; b < g.batch; ++b) {
      s1 += sums[(b * c + ch) * 2];
      s2 += sums[(b * c + ch) * 2 + 1];
    }
    const double mean = s1 / count;
    out[ch] = static_cast<float>(mean);
    out[c + ch] = static_cast<float>(std::max(0.0, s2 / count - mean * mean));
  }
  return ffi::Error::Success();
}

ffi::Error StemBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> g_pre,
                            ffi::Buffer<ffi::S8> first, ffi::Buffer<ffi::F32> coef,
                            ffi::ResultBuffer<ffi::F32> d_kernel) {
  const int64_t c = coef.element_count() / 4;
  if (auto error = CheckStemShapes(x, kernel, c); error.failure()) return error;
  auto xd = x.dimensions();
  const Geometry g(xd[0], xd[1], xd[2], c);
  if (g_pre.element_count() != static_cast<size_t>(g.batch * c * g.h2 * g.w2) ||
      first.element_count() != g_pre.element_count()) {
    return ffi::Error::InvalidArgument("i2m2 stem backward: g_pre and first must be [B, C, H/2, W/2]");
  }
  std::vector<double> partial(g.batch * 25 * c);
  std::function<void(int64_t)> example = [&](int64_t b) {
    thread_local std::vector<float> planes, gy;
    planes.resize(2 * g.plane);
    gy.resize(c * 4 * g.blocks * kLanes);
    StemBackwardExample(x.typed_data(), kernel.typed_data(), g_pre.typed_data(),
                        first.typed_data(), coef.typed_data(), g, b,
                        partial.data() + b * 25 * c, planes.data(), gy.data());
  };
  ParallelFor(pool, g.batch, example);
  float* out = d_kernel->typed_data();
  for (int64_t i = 0; i < 25 * c; ++i) {
    double s = 0;
    for (int64_t b = 0; b < g.batch; ++b) s += partial[b * 25 * c + i];
    out[i] = static_cast<float>(s);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(I2m2StemForward, StemForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(I2m2StemBackward, StemBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
