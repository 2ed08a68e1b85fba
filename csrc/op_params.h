// Arguments of one call of each savae_fast:: operator, as the device code sees
// them: raw pointers to contiguous [rows, cols] data, the sizes and the float
// hyper-parameters converted to the element type. Filled once per call by the
// operator (csrc/op_impl.h) and passed as one struct to the CPU loops
// (csrc/cpu) and the CUDA launchers (csrc/cuda), as flash-attention passes its
// Flash_fwd_params. Torch-free, so nvcc compiles it without torch headers.
//
// Symbols (docs/math.md): lbar = adjoint of lambda = (mu, logvar), pbar =
// adjoint of the momentum, v = J_clip pbar (lambda-space direction of the
// Hessian-vector product), u = dz/dlambda v (its z-space direction).
#pragma once

#include <cstdint>

#include "savae_math.h"

namespace savae_fast {

template <typename T>
struct SampleParams {
  int64_t numel;
  const T *mu, *logvar, *eps;
  T* z;
};

// The optimiser's hyper-parameters shared by the forward and reverse steps.
template <typename T>
struct StepScalars {
  T scale;      // s: 1 / batch size of the inner objective
  T kl_weight;  // beta
  T lr_mu, lr_logvar;
  T momentum;
  T max_grad_norm;  // <= 0: no clipping
};

template <typename T>
struct ForwardStepParams {
  int64_t rows, cols;
  const T *mu, *logvar, *p_mu, *p_logvar, *eps, *grad_z;
  const T* eps_next;  // null: no next sample
  T *mu_out, *logvar_out, *p_mu_out, *p_logvar_out;
  T* z_next_out;      // null when eps_next is
  T* grad_norms_out;  // [2]: |g_mu|, |g_logvar| over the batch
  T* partials;        // CUDA reduction workspace, null on CPU
  StepScalars<T> s;
};

template <typename T>
struct ReverseDirectionParams {
  int64_t rows, cols;
  const T *lbar_mu, *lbar_logvar, *pbar_mu, *pbar_logvar, *mu, *logvar, *eps, *grad_z;
  const T* grad_norms;  // [2], from forward_step
  T *pbar_mu_out, *pbar_logvar_out, *v_mu, *v_logvar, *u;
  T* z_eval;      // [n_eval, rows, cols]
  T* row_weight;  // [rows]
  T* partials;    // CUDA reduction workspace, null on CPU
  StepScalars<T> s;  // momentum unused
  math::FdMode fd_mode;
  T fd_step;
};

template <typename T>
struct ReverseUpdateParams {
  int64_t numel;
  const T *lbar_mu, *lbar_logvar, *pbar_mu, *pbar_logvar, *v_mu, *v_logvar, *logvar, *eps, *grad_z;
  const T *hvp_a, *hvp_b;  // hvp_b null: exact mode or forward difference against grad_z
  T *lbar_mu_out, *lbar_logvar_out, *pbar_mu_out, *pbar_logvar_out;
  T hvp_scale;
  StepScalars<T> s;  // lr_*, max_grad_norm unused
};

// One in-place addition total += value of `numel` elements, of any float dtype.
struct AccumulateItem {
  void* total;
  const void* value;
  int64_t numel;
};

}  // namespace savae_fast
