// Operator schemas of the savae_fast:: library (defined once; each backend
// registers its kernels with TORCH_LIBRARY_IMPL in its own file) and the
// Python module entry point of savae_fast._C.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

TORCH_LIBRARY(savae_fast, m) {
  // z = mu + exp(logvar / 2) * eps
  m.def("sample(Tensor mu, Tensor logvar, Tensor eps) -> Tensor");

  // One inner SVI step of the authors' optimiser, fused: ELBO gradient from
  // the decoder's dNLL/dz, clipping of g_mu and g_logvar by their norms over
  // the whole batch, heavy-ball momentum, update, and the next sample.
  // Returns (mu', logvar', p_mu', p_logvar', z_next, grad_norms[2]);
  // z_next is empty when eps_next is None.
  m.def(
      "forward_step(Tensor mu, Tensor logvar, Tensor p_mu, Tensor p_logvar, Tensor eps, "
      "Tensor grad_z, Tensor? eps_next, float scale, float kl_weight, float lr_mu, "
      "float lr_logvar, float momentum, float max_grad_norm) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // First half of one reverse step: pbar += lr * lbar, v = J_clip pbar, the
  // z-space direction u and the decoder evaluation points z_eval
  // ([1, B, D]: z (exact) or z + fd_step u (forward); [2, B, D]: z +- r_b u_b
  // (central)) with per-example loss weights (1 / (2 r_b) for central, else 1).
  // Returns (pbar_mu', pbar_logvar', v_mu, v_logvar, u, z_eval, row_weight).
  m.def(
      "reverse_direction(Tensor lbar_mu, Tensor lbar_logvar, Tensor pbar_mu, "
      "Tensor pbar_logvar, Tensor mu, Tensor logvar, Tensor eps, Tensor grad_z, "
      "Tensor grad_norms, float scale, float kl_weight, float lr_mu, float lr_logvar, "
      "float max_grad_norm, int fd_mode, float fd_step) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Second half: Hzz u = (hvp_a - hvp_b) * hvp_scale from the decoder, the
  // exact Gaussian second-order terms, lbar -= H v, pbar *= momentum.
  // Returns (lbar_mu', lbar_logvar', pbar_mu', pbar_logvar').
  m.def(
      "reverse_update(Tensor lbar_mu, Tensor lbar_logvar, Tensor pbar_mu, "
      "Tensor pbar_logvar, Tensor v_mu, Tensor v_logvar, Tensor logvar, Tensor eps, "
      "Tensor grad_z, Tensor hvp_a, Tensor? hvp_b, float hvp_scale, float scale, "
      "float kl_weight, float momentum) -> (Tensor, Tensor, Tensor, Tensor)");

  // In place, for every i with values[i] given: total[i] += values[i], with the
  // rounding error added to compensation[i] (compensated summation; the sum is
  // total + compensation).
  // Used to sum the decoder's parameter gradients over the K steps in one
  // float32 buffer pair, as accurately as in float64.
  m.def(
      "compensated_accumulate_(Tensor(a!)[] total, Tensor(b!)[] compensation, Tensor?[] values) -> ()");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef SAVAE_FAST_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef SAVAE_FAST_CUDA_ARCHS
  info["cuda_archs"] = std::string(SAVAE_FAST_CUDA_ARCHS);
#endif
  info["compiler"] = std::string(__VERSION__);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled kernels of savae_fast (operators are registered under torch.ops.savae_fast)";
  m.def("build_info", &build_info, "How this extension was built.");
}
