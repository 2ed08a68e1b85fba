// CUDA kernels of the savae_fast:: operators. Torch-free: the per-element math
// comes from savae_math.h (the same code as the CPU kernels), launches go on
// the caller's stream.
//
// Whole-tensor reductions (clip norms, clip-Jacobian dots) are deterministic and
// need no atomics and no host synchronisation, so a refinement loop is
// graph-capturable. Small tensors: one block reduces, then updates, in one
// launch. Larger ones: two stages, at most kMaxPartials blocks write per-block
// partial sums and every block of the consuming kernel (no more blocks than the
// device runs at once) reduces that workspace again. A reverse step whose forward
// step was not clipped needs no reduction: its first stage returns at once and
// the second reads the inputs once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../savae_math.h"
#include "kernels.h"

namespace savae_fast {
namespace cuda {
namespace {

namespace m = savae_fast::math;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGridStrideBlocks = 65535;
// The one-block path (small tensors): 512 threads leave each 128 registers (float64 math).
constexpr int kSmallThreads = 512;
constexpr int kSmallWarps = kSmallThreads / 32;

inline int blocks_for(int64_t n, int cap) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return int(std::max<int64_t>(1, std::min<int64_t>(b, cap)));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of a and b over a block of kBlockWarps warps; the result is valid in thread 0.
template <int kBlockWarps = kWarps, typename T>
__device__ __forceinline__ void block_sum2(T& a, T& b) {
  __shared__ T sa[kBlockWarps], sb[kBlockWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kBlockWarps ? sa[lane] : T(0);
    b = lane < kBlockWarps ? sb[lane] : T(0);
    a = warp_sum(a);
    b = warp_sum(b);
  }
  __syncthreads();
}

// Block-wide sums of a and b, broadcast to every thread.
template <int kBlockWarps, typename T>
__device__ __forceinline__ void block_sum2_broadcast(T* a, T* b) {
  __shared__ T result[2];
  block_sum2<kBlockWarps>(*a, *b);
  if (threadIdx.x == 0) {
    result[0] = *a;
    result[1] = *b;
  }
  __syncthreads();
  *a = result[0];
  *b = result[1];
}

// Sums of the two columns of a [count, 2] partials workspace, broadcast to the block.
template <typename T>
__device__ __forceinline__ void reduce_partials(const T* __restrict__ partials, int count, T* out0, T* out1) {
  T a = 0, b = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    a += partials[2 * i];
    b += partials[2 * i + 1];
  }
  block_sum2_broadcast<kWarps>(&a, &b);
  *out0 = a;
  *out1 = b;
}

// ------------------------------------------------------------------ kernels
template <typename T>
__global__ void sample_kernel(const T* __restrict__ mu, const T* __restrict__ lv, const T* __restrict__ eps,
                              T* __restrict__ z, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    z[i] = m::sample(mu[i], m::sigma_of(lv[i]), eps[i]);
}

// Per-element and per-row bodies, shared by the one-block and the two-launch kernels.

// (g_mu^2, g_logvar^2) of element i added to (a, b).
template <typename T>
__device__ __forceinline__ void add_grad_squares(int64_t i, const T* __restrict__ mu, const T* __restrict__ lv,
                                                 const T* __restrict__ eps, const T* __restrict__ gz, T scale,
                                                 T kl_weight, T& a, T& b) {
  T gm, gl;
  m::elbo_grad(gz[i], mu[i], m::gauss_terms(lv[i]), eps[i], scale, kl_weight, &gm, &gl);
  a += gm * gm;
  b += gl * gl;
}

// The clipped momentum step of element i and the next sample.
template <typename T>
__device__ __forceinline__ void forward_update_at(
    int64_t i, const T* __restrict__ mu, const T* __restrict__ lv, const T* __restrict__ p_mu,
    const T* __restrict__ p_lv, const T* __restrict__ eps, const T* __restrict__ gz, const T* __restrict__ eps_next,
    T* __restrict__ mu_out, T* __restrict__ lv_out, T* __restrict__ pm_out, T* __restrict__ pl_out,
    T* __restrict__ z_out, T scale, T kl_weight, T lr_mu, T lr_lv, T momentum, T c_mu, T c_lv) {
  T gm, gl;
  m::elbo_grad(gz[i], mu[i], m::gauss_terms(lv[i]), eps[i], scale, kl_weight, &gm, &gl);
  T mn, ln, pm, pl;
  m::momentum_step(mu[i], p_mu[i], gm, c_mu, lr_mu, momentum, &mn, &pm);
  m::momentum_step(lv[i], p_lv[i], gl, c_lv, lr_lv, momentum, &ln, &pl);
  mu_out[i] = mn;
  lv_out[i] = ln;
  pm_out[i] = pm;
  pl_out[i] = pl;
  if (eps_next != nullptr) z_out[i] = m::sample(mn, m::sigma_of(ln), eps_next[i]);
}

// pbar += lr * lbar at element i, and its (g_mu . pbar_mu, g_lv . pbar_lv) terms added to (a, b)
// (the dot products of the clip Jacobian; only where clipping is active).
template <typename T>
__device__ __forceinline__ void reverse_dots_at(int64_t i, const T* __restrict__ lbm, const T* __restrict__ lbl,
                                                const T* __restrict__ pbm, const T* __restrict__ pbl,
                                                const T* __restrict__ mu, const T* __restrict__ lv,
                                                const T* __restrict__ eps, const T* __restrict__ gz, T* pbm_out,
                                                T* pbl_out, T scale, T kl_weight, T lr_mu, T lr_lv, T& a, T& b) {
  const T pm = pbm[i] + lr_mu * lbm[i];
  const T pl = pbl[i] + lr_lv * lbl[i];
  pbm_out[i] = pm;
  pbl_out[i] = pl;
  T gm, gl;
  m::elbo_grad(gz[i], mu[i], m::gauss_terms(lv[i]), eps[i], scale, kl_weight, &gm, &gl);
  a += gm * pm;
  b += gl * pl;
}

// The clip-Jacobian coefficients of a reverse step.
template <typename T>
struct ClipJacobian {
  T c_mu, c_lv, k_mu, k_lv;
  bool clipped;
};

template <typename T>
__device__ __forceinline__ ClipJacobian<T> clip_jacobian(T n_mu, T n_lv, T max_norm) {
  const T c_mu = m::clip_coef(n_mu, max_norm), c_lv = m::clip_coef(n_lv, max_norm);
  return {c_mu, c_lv, T(0), T(0), c_mu < T(1) || c_lv < T(1)};
}

template <typename T>
__device__ __forceinline__ void set_kappas(ClipJacobian<T>& J, T n_mu, T n_lv, T max_norm, T dot_mu, T dot_lv) {
  J.k_mu = m::clip_jacobian_kappa(n_mu, max_norm, dot_mu);
  J.k_lv = m::clip_jacobian_kappa(n_lv, max_norm, dot_lv);
}

// The momentum adjoint of a reverse step: pbar' = pbar + lr lbar, computed by the row kernel
// itself (written to out) unless clipping is active: then the pass of the clip Jacobian's
// dot products has already written it to out.
template <typename T>
struct PbarUpdate {
  const T *lbm, *lbl, *pbm, *pbl;
  T *pbm_out, *pbl_out;
  T lr_mu, lr_lv;

  __device__ __forceinline__ void at(int64_t i, bool clipped, T* pm, T* pl) const {
    if (clipped) {
      *pm = pbm_out[i];
      *pl = pbl_out[i];
    } else {
      *pm = pbm[i] + lr_mu * lbm[i];
      *pl = pbl[i] + lr_lv * lbl[i];
      pbm_out[i] = *pm;
      pbl_out[i] = *pl;
    }
  }
};

// One row, by one warp: pbar', v = J pbar', u, the evaluation points and the row weight.
template <typename T>
__device__ __forceinline__ void reverse_row(int64_t row, int lane, const PbarUpdate<T>& pbar,
                                            const T* __restrict__ mu, const T* __restrict__ lv,
                                            const T* __restrict__ eps, const T* __restrict__ gz,
                                            T* __restrict__ v_mu, T* __restrict__ v_lv, T* __restrict__ u,
                                            T* __restrict__ z_eval, T* __restrict__ row_weight, int64_t cols,
                                            int64_t n, const ClipJacobian<T>& J, T scale, T kl_weight, int fd_mode,
                                            T fd_step) {
  T uu = 0, zz = 0;
  for (int64_t j = lane; j < cols; j += 32) {
    const int64_t i = row * cols + j;
    const m::GaussTerms<T> q = m::gauss_terms(lv[i]);
    T pm, pl;
    pbar.at(i, J.clipped, &pm, &pl);
    T vm = J.c_mu * pm, vl = J.c_lv * pl;
    if (J.clipped) {
      T gm, gl;
      m::elbo_grad(gz[i], mu[i], q, eps[i], scale, kl_weight, &gm, &gl);
      vm -= J.k_mu * gm;
      vl -= J.k_lv * gl;
    }
    const T ui = m::z_direction(vm, vl, q.sigma, eps[i]);
    const T zi = m::sample(mu[i], q.sigma, eps[i]);
    v_mu[i] = vm;
    v_lv[i] = vl;
    u[i] = ui;
    z_eval[i] = fd_mode == m::kForward ? zi + fd_step * ui : zi;
    uu += ui * ui;
    zz += zi * zi;
  }
  uu = warp_sum(uu);
  zz = warp_sum(zz);
  uu = __shfl_sync(0xffffffffu, uu, 0);
  zz = __shfl_sync(0xffffffffu, zz, 0);
  T r = fd_step, w = T(1);
  if (fd_mode == m::kCentral) {
    m::central_step(sqrt(zz), sqrt(uu), fd_step, &r, &w);
    for (int64_t j = lane; j < cols; j += 32) {
      const int64_t i = row * cols + j;
      const T zi = z_eval[i], du = r * u[i];
      z_eval[i] = zi + du;
      z_eval[n + i] = zi - du;
    }
  }
  if (lane == 0) row_weight[row] = w;
}

// -- two launches: per-block partial sums, then every block reduces them and updates
template <typename T>
__global__ void grad_norm_partials_kernel(const T* __restrict__ mu, const T* __restrict__ lv,
                                          const T* __restrict__ eps, const T* __restrict__ gz,
                                          T* __restrict__ partials, int64_t n, T scale, T kl_weight) {
  T a = 0, b = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    add_grad_squares(i, mu, lv, eps, gz, scale, kl_weight, a, b);
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = a;
    partials[2 * blockIdx.x + 1] = b;
  }
}

// Grid-stride over the whole tensor with as many blocks as are resident at once
// (launch_forward_step): every block reduces the whole workspace before its first
// element, so one block per 256 elements would re-read it thousands of times.
template <typename T>
__global__ void forward_update_kernel(const T* __restrict__ mu, const T* __restrict__ lv,
                                      const T* __restrict__ p_mu, const T* __restrict__ p_lv,
                                      const T* __restrict__ eps, const T* __restrict__ gz,
                                      const T* __restrict__ eps_next, T* __restrict__ mu_out,
                                      T* __restrict__ lv_out, T* __restrict__ pm_out, T* __restrict__ pl_out,
                                      T* __restrict__ z_out, T* __restrict__ norms_out,
                                      const T* __restrict__ partials, int num_partials, int64_t n, T scale,
                                      T kl_weight, T lr_mu, T lr_lv, T momentum, T max_norm) {
  T sq_mu, sq_lv;
  reduce_partials(partials, num_partials, &sq_mu, &sq_lv);
  const T n_mu = sqrt(sq_mu), n_lv = sqrt(sq_lv);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    norms_out[0] = n_mu;
    norms_out[1] = n_lv;
  }
  const T c_mu = m::clip_coef(n_mu, max_norm), c_lv = m::clip_coef(n_lv, max_norm);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    forward_update_at(i, mu, lv, p_mu, p_lv, eps, gz, eps_next, mu_out, lv_out, pm_out, pl_out, z_out, scale,
                      kl_weight, lr_mu, lr_lv, momentum, c_mu, c_lv);
}

// First pass of a reverse step where clipping was active in its forward step: pbar' and
// the partial sums of the clip Jacobian's dot products. Without clipping (decided from
// grad_norms on the device, uniformly for the grid) it does nothing: the row kernel then
// computes pbar' itself and the step reads its inputs once.
template <typename T>
__global__ void reverse_dots_kernel(const T* __restrict__ lbm, const T* __restrict__ lbl,
                                    const T* __restrict__ pbm, const T* __restrict__ pbl, const T* __restrict__ mu,
                                    const T* __restrict__ lv, const T* __restrict__ eps, const T* __restrict__ gz,
                                    const T* __restrict__ grad_norms, T* __restrict__ pbm_out,
                                    T* __restrict__ pbl_out, T* __restrict__ partials, int64_t n, T scale,
                                    T kl_weight, T lr_mu, T lr_lv, T max_norm) {
  if (!clip_jacobian(grad_norms[0], grad_norms[1], max_norm).clipped) return;
  T a = 0, b = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    reverse_dots_at(i, lbm, lbl, pbm, pbl, mu, lv, eps, gz, pbm_out, pbl_out, scale, kl_weight, lr_mu, lr_lv, a, b);
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = a;
    partials[2 * blockIdx.x + 1] = b;
  }
}

// One warp per row, grid-stride over the rows with at most the resident blocks (as
// forward_update_kernel: with clipping every block reduces the workspace first).
template <typename T>
__global__ void reverse_rows_kernel(const T* __restrict__ lbm, const T* __restrict__ lbl,
                                    const T* __restrict__ pbm, const T* __restrict__ pbl, T* pbm_out, T* pbl_out,
                                    const T* __restrict__ mu, const T* __restrict__ lv, const T* __restrict__ eps,
                                    const T* __restrict__ gz, const T* __restrict__ grad_norms,
                                    const T* __restrict__ partials, int num_partials, T* __restrict__ v_mu,
                                    T* __restrict__ v_lv, T* __restrict__ u, T* __restrict__ z_eval,
                                    T* __restrict__ row_weight, int64_t rows, int64_t cols, T scale, T kl_weight,
                                    T lr_mu, T lr_lv, T max_norm, int fd_mode, T fd_step) {
  const T n_mu = grad_norms[0], n_lv = grad_norms[1];
  ClipJacobian<T> J = clip_jacobian(n_mu, n_lv, max_norm);
  if (J.clipped) {  // uniform across the grid: every block takes this branch or none
    T dot_mu, dot_lv;
    reduce_partials(partials, num_partials, &dot_mu, &dot_lv);
    set_kappas(J, n_mu, n_lv, max_norm, dot_mu, dot_lv);
  }
  // with clipping reverse_dots_kernel wrote pbar'; without, it did nothing and pbar' is made here
  const PbarUpdate<T> pbar{lbm, lbl, pbm, pbl, pbm_out, pbl_out, lr_mu, lr_lv};
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  for (int64_t row = blockIdx.x * int64_t(kWarps) + threadIdx.x / 32; row < rows; row += warps)
    reverse_row(row, lane, pbar, mu, lv, eps, gz, v_mu, v_lv, u, z_eval, row_weight, cols, rows * cols, J, scale,
                kl_weight, fd_mode, fd_step);
}

// -- one launch of one block: the reduction, a barrier, the element-wise part
template <typename T>
__global__ void __launch_bounds__(kSmallThreads)
    forward_step_one_block_kernel(const T* __restrict__ mu, const T* __restrict__ lv, const T* __restrict__ p_mu,
                                  const T* __restrict__ p_lv, const T* __restrict__ eps, const T* __restrict__ gz,
                                  const T* __restrict__ eps_next, T* __restrict__ mu_out, T* __restrict__ lv_out,
                                  T* __restrict__ pm_out, T* __restrict__ pl_out, T* __restrict__ z_out,
                                  T* __restrict__ norms_out, int64_t n, T scale, T kl_weight, T lr_mu, T lr_lv,
                                  T momentum, T max_norm) {
  T sq_mu = 0, sq_lv = 0;
  for (int64_t i = threadIdx.x; i < n; i += kSmallThreads)
    add_grad_squares(i, mu, lv, eps, gz, scale, kl_weight, sq_mu, sq_lv);
  block_sum2_broadcast<kSmallWarps>(&sq_mu, &sq_lv);
  const T n_mu = sqrt(sq_mu), n_lv = sqrt(sq_lv);
  if (threadIdx.x == 0) {
    norms_out[0] = n_mu;
    norms_out[1] = n_lv;
  }
  const T c_mu = m::clip_coef(n_mu, max_norm), c_lv = m::clip_coef(n_lv, max_norm);
  for (int64_t i = threadIdx.x; i < n; i += kSmallThreads)
    forward_update_at(i, mu, lv, p_mu, p_lv, eps, gz, eps_next, mu_out, lv_out, pm_out, pl_out, z_out, scale,
                      kl_weight, lr_mu, lr_lv, momentum, c_mu, c_lv);
}

// With clipping, pbar_*_out is written in the first part and read in the second (not
// __restrict__); the barrier inside block_sum2_broadcast makes the block's writes visible
// to it. Without clipping there is no first part: the rows make pbar' themselves.
template <typename T>
__global__ void __launch_bounds__(kSmallThreads) reverse_direction_one_block_kernel(
    const T* __restrict__ lbm, const T* __restrict__ lbl, const T* __restrict__ pbm, const T* __restrict__ pbl,
    const T* __restrict__ mu, const T* __restrict__ lv, const T* __restrict__ eps, const T* __restrict__ gz,
    const T* __restrict__ grad_norms, T* pbm_out, T* pbl_out, T* __restrict__ v_mu, T* __restrict__ v_lv,
    T* __restrict__ u, T* __restrict__ z_eval, T* __restrict__ row_weight, int64_t rows, int64_t cols, T scale,
    T kl_weight, T lr_mu, T lr_lv, T max_norm, int fd_mode, T fd_step) {
  const int64_t n = rows * cols;
  const T n_mu = grad_norms[0], n_lv = grad_norms[1];
  ClipJacobian<T> J = clip_jacobian(n_mu, n_lv, max_norm);
  if (J.clipped) {  // uniform across the block
    T dot_mu = 0, dot_lv = 0;
    for (int64_t i = threadIdx.x; i < n; i += kSmallThreads)
      reverse_dots_at(i, lbm, lbl, pbm, pbl, mu, lv, eps, gz, pbm_out, pbl_out, scale, kl_weight, lr_mu, lr_lv,
                      dot_mu, dot_lv);
    block_sum2_broadcast<kSmallWarps>(&dot_mu, &dot_lv);
    set_kappas(J, n_mu, n_lv, max_norm, dot_mu, dot_lv);
  }
  const PbarUpdate<T> pbar{lbm, lbl, pbm, pbl, pbm_out, pbl_out, lr_mu, lr_lv};
  const int lane = threadIdx.x % 32;
  for (int64_t row = threadIdx.x / 32; row < rows; row += kSmallWarps)
    reverse_row(row, lane, pbar, mu, lv, eps, gz, v_mu, v_lv, u, z_eval, row_weight, cols, n, J, scale, kl_weight,
                fd_mode, fd_step);
}

template <typename T>
__global__ void reverse_update_kernel(const T* __restrict__ lbm, const T* __restrict__ lbl,
                                      const T* __restrict__ pbm, const T* __restrict__ pbl,
                                      const T* __restrict__ vm, const T* __restrict__ vl, const T* __restrict__ lv,
                                      const T* __restrict__ eps, const T* __restrict__ gz,
                                      const T* __restrict__ hvp_a, const T* __restrict__ hvp_b,
                                      T* __restrict__ lbm_out, T* __restrict__ lbl_out, T* __restrict__ pbm_out,
                                      T* __restrict__ pbl_out, int64_t n, T hvp_scale, T scale, T kl_weight,
                                      T momentum) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const T hzz = m::difference_quotient(hvp_a[i], hvp_b != nullptr ? hvp_b[i] : T(0), hvp_scale);
    T hm, hl;
    m::gaussian_hvp(hzz, vm[i], vl[i], gz[i], m::gauss_terms(lv[i]), eps[i], scale, kl_weight, &hm, &hl);
    lbm_out[i] = lbm[i] - hm;
    lbl_out[i] = lbl[i] - hl;
    pbm_out[i] = momentum * pbm[i];
    pbl_out[i] = momentum * pbl[i];
  }
}

// total[j] += value[j] for a batch of items; block b handles a slice of one
// item. Half and bfloat16 add in float and round once, as torch's add.
constexpr int kMaxItemsPerLaunch = 64;
struct AccumulateBatch {
  AccumulateItem items[kMaxItemsPerLaunch];
  int first_block[kMaxItemsPerLaunch + 1];  // blocks of item i: [first_block[i], first_block[i + 1])
  int count;
};

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_float(float x, __half* out) { *out = __float2half_rn(x); }
__device__ __forceinline__ void from_float(float x, __nv_bfloat16* out) { *out = __float2bfloat16_rn(x); }

template <typename T>
__device__ __forceinline__ void add_into(T* total, const T* value) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    *total += *value;
  } else {
    from_float(to_float(*total) + to_float(*value), total);
  }
}

constexpr int kAccumulateElementsPerBlock = kThreads * 8;

template <typename T>
__global__ void accumulate_kernel(const AccumulateBatch batch) {
  int item = 0;
  while (item + 1 < batch.count && int(blockIdx.x) >= batch.first_block[item + 1]) ++item;
  const AccumulateItem it = batch.items[item];
  const int64_t begin = int64_t(blockIdx.x - batch.first_block[item]) * kAccumulateElementsPerBlock;
  const int64_t end = begin + kAccumulateElementsPerBlock < it.numel ? begin + kAccumulateElementsPerBlock : it.numel;
  T* total = static_cast<T*>(it.total);
  const T* value = static_cast<const T*>(it.value);
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) add_into(total + j, value + j);
}

template <typename T>
void accumulate_typed(const std::vector<AccumulateItem>& items, cudaStream_t stream) {
  AccumulateBatch batch{};
  int64_t blocks = 0;
  auto flush = [&] {
    if (batch.count == 0) return;
    accumulate_kernel<T><<<int(blocks), kThreads, 0, stream>>>(batch);
    batch = AccumulateBatch{};
    blocks = 0;
  };
  for (const AccumulateItem& it : items) {
    int64_t done = 0;
    // An item larger than one launch's grid is split into several items.
    while (done < it.numel) {
      const int64_t room = (int64_t(kMaxGridStrideBlocks) - blocks) * kAccumulateElementsPerBlock;
      if (room <= 0 || batch.count == kMaxItemsPerLaunch) {
        flush();
        continue;
      }
      const int64_t n = it.numel - done < room ? it.numel - done : room;
      batch.items[batch.count] = {static_cast<T*>(it.total) + done, static_cast<const T*>(it.value) + done, n};
      batch.first_block[batch.count] = int(blocks);
      blocks += (n + kAccumulateElementsPerBlock - 1) / kAccumulateElementsPerBlock;
      batch.first_block[++batch.count] = int(blocks);
      done += n;
    }
  }
  flush();
}

}  // namespace

// ---------------------------------------------------------------- launchers
template <typename T>
void launch_sample(const SampleParams<T>& p, cudaStream_t stream) {
  sample_kernel<T><<<blocks_for(p.numel, kMaxGridStrideBlocks), kThreads, 0, stream>>>(p.mu, p.logvar, p.eps, p.z,
                                                                                        p.numel);
}

namespace {
// Measured on an H100 (benchmarks/op_level.py bench_latency, device time in a graph): one
// block of 512 threads takes 2.9 us for forward_step at 1,024 elements and 20 us at 16,384,
// the two launches 3.9-4.3 us at both; they break even near 2,048, where the one block
// still saves the host a launch.
std::atomic<int64_t> g_single_block_max_elements{2048};
}  // namespace

int64_t single_block_max_elements() { return g_single_block_max_elements.load(std::memory_order_relaxed); }

void set_single_block_max_elements(int64_t numel) {
  g_single_block_max_elements.store(std::max<int64_t>(0, numel), std::memory_order_relaxed);
}

int64_t reduction_partials(int64_t numel) {
  return numel <= single_block_max_elements() ? 0 : blocks_for(numel, kMaxPartials);
}

namespace {
constexpr int kMaxDevices = 64;

// How many blocks of kThreads of `kernel` the current device runs at once (its
// occupancy times the SMs), queried once per kernel and device. The kernels that
// reduce the partials workspace in every block launch at most this many. Not queried
// while `stream` is being captured into a CUDA graph (the workspace's size then, until
// an eager call has asked; the graph helpers warm up eagerly before capturing).
template <auto kernel>
int resident_blocks(cudaStream_t stream) {
  static std::atomic<int> per_device[kMaxDevices];  // 0: not queried yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return kMaxPartials;
  int blocks = per_device[device].load(std::memory_order_relaxed);
  if (blocks == 0) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone)
      return kMaxPartials;
    int sms = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0) != cudaSuccess) {
      (void)cudaGetLastError();  // not sticky: fall back to the workspace's size
      return kMaxPartials;
    }
    blocks = std::max(1, sms * per_sm);
    per_device[device].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}
}  // namespace

// Without a workspace (reduction_partials() == 0 when the operator allocated it): the one-block kernel.
template <typename T>
void launch_forward_step(const ForwardStepParams<T>& p, cudaStream_t stream) {
  const int64_t n = p.rows * p.cols;
  const StepScalars<T>& s = p.s;
  if (p.partials == nullptr) {
    forward_step_one_block_kernel<T><<<1, kSmallThreads, 0, stream>>>(
        p.mu, p.logvar, p.p_mu, p.p_logvar, p.eps, p.grad_z, p.eps_next, p.mu_out, p.logvar_out, p.p_mu_out,
        p.p_logvar_out, p.z_next_out, p.grad_norms_out, n, s.scale, s.kl_weight, s.lr_mu, s.lr_logvar, s.momentum,
        s.max_grad_norm);
    return;
  }
  const int parts = blocks_for(n, kMaxPartials);
  grad_norm_partials_kernel<T><<<parts, kThreads, 0, stream>>>(p.mu, p.logvar, p.eps, p.grad_z, p.partials, n,
                                                                s.scale, s.kl_weight);
  const int update_blocks = blocks_for(n, resident_blocks<forward_update_kernel<T>>(stream));
  forward_update_kernel<T><<<update_blocks, kThreads, 0, stream>>>(
      p.mu, p.logvar, p.p_mu, p.p_logvar, p.eps, p.grad_z, p.eps_next, p.mu_out, p.logvar_out, p.p_mu_out,
      p.p_logvar_out, p.z_next_out, p.grad_norms_out, p.partials, parts, n, s.scale, s.kl_weight, s.lr_mu,
      s.lr_logvar, s.momentum, s.max_grad_norm);
}

template <typename T>
void launch_reverse_direction(const ReverseDirectionParams<T>& p, cudaStream_t stream) {
  const int64_t rows = p.rows, cols = p.cols, n = rows * cols;
  const StepScalars<T>& s = p.s;
  if (p.partials == nullptr) {
    reverse_direction_one_block_kernel<T><<<1, kSmallThreads, 0, stream>>>(
        p.lbar_mu, p.lbar_logvar, p.pbar_mu, p.pbar_logvar, p.mu, p.logvar, p.eps, p.grad_z, p.grad_norms,
        p.pbar_mu_out, p.pbar_logvar_out, p.v_mu, p.v_logvar, p.u, p.z_eval, p.row_weight, rows, cols, s.scale,
        s.kl_weight, s.lr_mu, s.lr_logvar, s.max_grad_norm, int(p.fd_mode), p.fd_step);
    return;
  }
  const int parts = blocks_for(n, kMaxPartials);
  if (s.max_grad_norm > T(0))  // else never clipped: no first pass to launch
    reverse_dots_kernel<T><<<parts, kThreads, 0, stream>>>(
        p.lbar_mu, p.lbar_logvar, p.pbar_mu, p.pbar_logvar, p.mu, p.logvar, p.eps, p.grad_z, p.grad_norms,
        p.pbar_mu_out, p.pbar_logvar_out, p.partials, n, s.scale, s.kl_weight, s.lr_mu, s.lr_logvar,
        s.max_grad_norm);
  const int64_t row_blocks =
      std::min<int64_t>((rows + kWarps - 1) / kWarps, resident_blocks<reverse_rows_kernel<T>>(stream));
  reverse_rows_kernel<T><<<int(std::max<int64_t>(1, row_blocks)), kThreads, 0, stream>>>(
      p.lbar_mu, p.lbar_logvar, p.pbar_mu, p.pbar_logvar, p.pbar_mu_out, p.pbar_logvar_out, p.mu, p.logvar, p.eps,
      p.grad_z, p.grad_norms, p.partials, parts, p.v_mu, p.v_logvar, p.u, p.z_eval, p.row_weight, rows, cols, s.scale,
      s.kl_weight, s.lr_mu, s.lr_logvar, s.max_grad_norm, int(p.fd_mode), p.fd_step);
}

template <typename T>
void launch_reverse_update(const ReverseUpdateParams<T>& p, cudaStream_t stream) {
  const StepScalars<T>& s = p.s;
  reverse_update_kernel<T><<<blocks_for(p.numel, kMaxGridStrideBlocks), kThreads, 0, stream>>>(
      p.lbar_mu, p.lbar_logvar, p.pbar_mu, p.pbar_logvar, p.v_mu, p.v_logvar, p.logvar, p.eps, p.grad_z, p.hvp_a,
      p.hvp_b, p.lbar_mu_out, p.lbar_logvar_out, p.pbar_mu_out, p.pbar_logvar_out, p.numel, p.hvp_scale, s.scale,
      s.kl_weight, s.momentum);
}

void launch_accumulate(AccumulateType type, const std::vector<AccumulateItem>& items, cudaStream_t stream) {
  switch (type) {
    case AccumulateType::kFloat: return accumulate_typed<float>(items, stream);
    case AccumulateType::kDouble: return accumulate_typed<double>(items, stream);
    case AccumulateType::kHalf: return accumulate_typed<__half>(items, stream);
    case AccumulateType::kBFloat16: return accumulate_typed<__nv_bfloat16>(items, stream);
  }
}

#define SAVAE_INSTANTIATE(T)                                                          \
  template void launch_sample<T>(const SampleParams<T>&, cudaStream_t);               \
  template void launch_forward_step<T>(const ForwardStepParams<T>&, cudaStream_t);    \
  template void launch_reverse_direction<T>(const ReverseDirectionParams<T>&, cudaStream_t); \
  template void launch_reverse_update<T>(const ReverseUpdateParams<T>&, cudaStream_t);

SAVAE_INSTANTIATE(float)
SAVAE_INSTANTIATE(double)
#undef SAVAE_INSTANTIATE

}  // namespace cuda
}  // namespace savae_fast
