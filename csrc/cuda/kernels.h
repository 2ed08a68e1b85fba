// Launchers of the CUDA kernels (torch-free: raw pointers and a stream), shared
// between the nvcc-compiled kernels and the host-side operator registration.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace savae_fast {
namespace cuda {

// Workspace of the two-stage reductions: [kMaxPartials, 2] values.
constexpr int kMaxPartials = 1024;

template <typename T>
void launch_sample(const T* mu, const T* logvar, const T* eps, T* z, int64_t n, cudaStream_t stream);

// forward_step; partials: a [kMaxPartials, 2] workspace.
template <typename T>
void launch_forward_step(const T* mu, const T* logvar, const T* p_mu, const T* p_logvar, const T* eps,
                         const T* grad_z, const T* eps_next, T* mu_out, T* logvar_out, T* p_mu_out,
                         T* p_logvar_out, T* z_out, T* norms_out, T* partials, int64_t n, T scale, T kl_weight,
                         T lr_mu, T lr_logvar, T momentum, T max_grad_norm, cudaStream_t stream);

template <typename T>
void launch_reverse_direction(const T* lbar_mu, const T* lbar_logvar, const T* pbar_mu, const T* pbar_logvar,
                              const T* mu, const T* logvar, const T* eps, const T* grad_z, const T* grad_norms,
                              T* pbar_mu_out, T* pbar_logvar_out, T* v_mu, T* v_logvar, T* u, T* z_eval,
                              T* row_weight, T* partials, int64_t rows, int64_t cols, T scale, T kl_weight, T lr_mu,
                              T lr_logvar, T max_grad_norm, int fd_mode, T fd_step, cudaStream_t stream);

template <typename T>
void launch_reverse_update(const T* lbar_mu, const T* lbar_logvar, const T* pbar_mu, const T* pbar_logvar,
                           const T* v_mu, const T* v_logvar, const T* logvar, const T* eps, const T* grad_z,
                           const T* hvp_a, const T* hvp_b, T* lbar_mu_out, T* lbar_logvar_out, T* pbar_mu_out,
                           T* pbar_logvar_out, int64_t n, T hvp_scale, T scale, T kl_weight, T momentum,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace savae_fast
