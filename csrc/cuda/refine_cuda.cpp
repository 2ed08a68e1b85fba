// CUDA registrations of the savae_fast:: operators: argument checks and output
// allocation (op_common.h, shared with the CPU kernels), then the torch-free
// launchers of kernels.cu on the current stream. Nothing here waits for
// the device.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../op_common.h"
#include "kernels.h"

namespace savae_fast {
namespace {

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* mut(at::Tensor& t) {
  return t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

void check_cuda(const char* op, const MatrixArgs& m) {
  TORCH_CHECK(m[0].is_cuda(), "savae_fast::", op, ": CUDA kernel called with tensors on ", m[0].device());
}

at::Tensor partials_workspace(const MatrixArgs& m) {
  return at::empty({cuda::kMaxPartials, 2}, m[0].options());
}

at::Tensor sample_cuda(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps) {
  auto m = check_matrices("sample", {{"mu", &mu}, {"logvar", &logvar}, {"eps", &eps}});
  check_cuda("sample", m);
  const c10::cuda::CUDAGuard guard(m[0].device());
  at::Tensor z = at::empty_like(m[0]);
  AT_DISPATCH_FLOATING_TYPES(m.dtype(), "savae_fast::sample", [&] {
    cuda::launch_sample<scalar_t>(ptr<scalar_t>(m[0]), ptr<scalar_t>(m[1]), ptr<scalar_t>(m[2]), mut<scalar_t>(z),
                                  m[0].numel(), c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_step_cuda(
    const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& p_mu, const at::Tensor& p_logvar,
    const at::Tensor& eps, const at::Tensor& grad_z, const std::optional<at::Tensor>& eps_next, double scale,
    double kl_weight, double lr_mu, double lr_logvar, double momentum, double max_grad_norm) {
  const char* op = "forward_step";
  auto m = check_matrices(op, {{"mu", &mu}, {"logvar", &logvar}, {"p_mu", &p_mu}, {"p_logvar", &p_logvar},
                               {"eps", &eps}, {"grad_z", &grad_z}});
  check_cuda(op, m);
  const bool has_next = eps_next.has_value() && eps_next->defined();
  const at::Tensor en = has_next ? check_like(op, "eps_next", *eps_next, m) : at::Tensor();
  for (auto [name, v] : {std::pair{"scale", scale}, {"kl_weight", kl_weight}, {"lr_mu", lr_mu},
                         {"lr_logvar", lr_logvar}, {"momentum", momentum}, {"max_grad_norm", max_grad_norm}})
    check_finite_scalar(op, name, v);
  const c10::cuda::CUDAGuard guard(m[0].device());
  at::Tensor mu_n = at::empty_like(m[0]), lv_n = at::empty_like(m[0]);
  at::Tensor pm_n = at::empty_like(m[0]), pl_n = at::empty_like(m[0]);
  at::Tensor z_n = has_next ? at::empty_like(m[0]) : at::empty({0}, m[0].options());
  at::Tensor norms = at::empty({2}, m[0].options());
  at::Tensor partials = partials_workspace(m);
  AT_DISPATCH_FLOATING_TYPES(m.dtype(), "savae_fast::forward_step", [&] {
    using T = scalar_t;
    cuda::launch_forward_step<T>(ptr<T>(m[0]), ptr<T>(m[1]), ptr<T>(m[2]), ptr<T>(m[3]), ptr<T>(m[4]),
                                 ptr<T>(m[5]), has_next ? ptr<T>(en) : nullptr, mut<T>(mu_n), mut<T>(lv_n),
                                 mut<T>(pm_n), mut<T>(pl_n), has_next ? mut<T>(z_n) : nullptr, mut<T>(norms),
                                 mut<T>(partials), m[0].numel(), T(scale), T(kl_weight), T(lr_mu), T(lr_logvar),
                                 T(momentum), T(max_grad_norm), c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mu_n, lv_n, pm_n, pl_n, z_n, norms};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
reverse_direction_cuda(const at::Tensor& lbar_mu, const at::Tensor& lbar_logvar, const at::Tensor& pbar_mu,
                       const at::Tensor& pbar_logvar, const at::Tensor& mu, const at::Tensor& logvar,
                       const at::Tensor& eps, const at::Tensor& grad_z, const at::Tensor& grad_norms,
                       double scale, double kl_weight, double lr_mu, double lr_logvar, double max_grad_norm,
                       int64_t fd_mode, double fd_step) {
  const char* op = "reverse_direction";
  auto m = check_matrices(op, {{"lbar_mu", &lbar_mu}, {"lbar_logvar", &lbar_logvar}, {"pbar_mu", &pbar_mu},
                               {"pbar_logvar", &pbar_logvar}, {"mu", &mu}, {"logvar", &logvar}, {"eps", &eps},
                               {"grad_z", &grad_z}});
  check_cuda(op, m);
  const at::Tensor norms = check_grad_norms(op, grad_norms, m);
  check_fd_mode(op, fd_mode);
  for (auto [name, v] : {std::pair{"scale", scale}, {"kl_weight", kl_weight}, {"lr_mu", lr_mu},
                         {"lr_logvar", lr_logvar}, {"max_grad_norm", max_grad_norm}, {"fd_step", fd_step}})
    check_finite_scalar(op, name, v);
  const c10::cuda::CUDAGuard guard(m[0].device());
  const int64_t B = m.rows, D = m.cols;
  at::Tensor pbm_n = at::empty_like(m[0]), pbl_n = at::empty_like(m[0]);
  at::Tensor v_mu = at::empty_like(m[0]), v_lv = at::empty_like(m[0]), u = at::empty_like(m[0]);
  at::Tensor z_eval = at::empty({num_eval_points(fd_mode), B, D}, m[0].options());
  at::Tensor row_weight = at::empty({B}, m[0].options());
  at::Tensor partials = partials_workspace(m);
  AT_DISPATCH_FLOATING_TYPES(m.dtype(), "savae_fast::reverse_direction", [&] {
    using T = scalar_t;
    cuda::launch_reverse_direction<T>(ptr<T>(m[0]), ptr<T>(m[1]), ptr<T>(m[2]), ptr<T>(m[3]), ptr<T>(m[4]),
                                      ptr<T>(m[5]), ptr<T>(m[6]), ptr<T>(m[7]), ptr<T>(norms), mut<T>(pbm_n),
                                      mut<T>(pbl_n), mut<T>(v_mu), mut<T>(v_lv), mut<T>(u), mut<T>(z_eval),
                                      mut<T>(row_weight), mut<T>(partials), B, D, T(scale), T(kl_weight), T(lr_mu),
                                      T(lr_logvar), T(max_grad_norm), int(fd_mode), T(fd_step),
                                      c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {pbm_n, pbl_n, v_mu, v_lv, u, z_eval, row_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reverse_update_cuda(
    const at::Tensor& lbar_mu, const at::Tensor& lbar_logvar, const at::Tensor& pbar_mu, const at::Tensor& pbar_logvar,
    const at::Tensor& v_mu, const at::Tensor& v_logvar, const at::Tensor& logvar, const at::Tensor& eps,
    const at::Tensor& grad_z, const at::Tensor& hvp_a, const std::optional<at::Tensor>& hvp_b, double hvp_scale,
    double scale, double kl_weight, double momentum) {
  const char* op = "reverse_update";
  auto m = check_matrices(op, {{"lbar_mu", &lbar_mu}, {"lbar_logvar", &lbar_logvar}, {"pbar_mu", &pbar_mu},
                               {"pbar_logvar", &pbar_logvar}, {"v_mu", &v_mu}, {"v_logvar", &v_logvar},
                               {"logvar", &logvar}, {"eps", &eps}, {"grad_z", &grad_z}, {"hvp_a", &hvp_a}});
  check_cuda(op, m);
  const bool has_b = hvp_b.has_value() && hvp_b->defined();
  const at::Tensor hb = has_b ? check_like(op, "hvp_b", *hvp_b, m) : at::Tensor();
  for (auto [name, v] : {std::pair{"hvp_scale", hvp_scale}, {"scale", scale}, {"kl_weight", kl_weight},
                         {"momentum", momentum}})
    check_finite_scalar(op, name, v);
  const c10::cuda::CUDAGuard guard(m[0].device());
  at::Tensor lbm_n = at::empty_like(m[0]), lbl_n = at::empty_like(m[0]);
  at::Tensor pbm_n = at::empty_like(m[0]), pbl_n = at::empty_like(m[0]);
  AT_DISPATCH_FLOATING_TYPES(m.dtype(), "savae_fast::reverse_update", [&] {
    using T = scalar_t;
    cuda::launch_reverse_update<T>(ptr<T>(m[0]), ptr<T>(m[1]), ptr<T>(m[2]), ptr<T>(m[3]), ptr<T>(m[4]),
                                   ptr<T>(m[5]), ptr<T>(m[6]), ptr<T>(m[7]), ptr<T>(m[8]), ptr<T>(m[9]),
                                   has_b ? ptr<T>(hb) : nullptr, mut<T>(lbm_n), mut<T>(lbl_n), mut<T>(pbm_n),
                                   mut<T>(pbl_n), m[0].numel(), T(hvp_scale), T(scale), T(kl_weight), T(momentum),
                                   c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {lbm_n, lbl_n, pbm_n, pbl_n};
}

void accumulate_cuda(at::TensorList total, const c10::List<std::optional<at::Tensor>>& values) {
  check_accumulate_lists(total, values);
  std::vector<at::Tensor> dst, src;
  for (size_t i = 0; i < total.size(); ++i) {
    const std::optional<at::Tensor> v = values.get(i);
    if (!v.has_value() || !v->defined()) continue;
    TORCH_CHECK(total[i].is_cuda(), "savae_fast::accumulate_: CUDA kernel called with 'total'[", i, "] on ",
                total[i].device());
    dst.push_back(total[i]);
    src.push_back(*v);
  }
  if (dst.empty()) return;
  const c10::cuda::CUDAGuard guard(dst[0].device());
  // ATen's multi-tensor kernel: a few launches for all parameters.
  at::_foreach_add_(dst, src);
}

}  // namespace

TORCH_LIBRARY_IMPL(savae_fast, CUDA, m) {
  m.impl("sample", &sample_cuda);
  m.impl("forward_step", &forward_step_cuda);
  m.impl("reverse_direction", &reverse_direction_cuda);
  m.impl("reverse_update", &reverse_update_cuda);
  m.impl("accumulate_", &accumulate_cuda);
}

}  // namespace savae_fast
