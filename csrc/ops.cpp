// Operator schemas of the savae_fast:: library (defined once; the operators
// are written once in op_impl.h and each backend registers them for its
// dispatch key in its own file), the extension's build information, and the
// module entry point of savae_fast._C.
//
// Everything here and in the backends uses only the LibTorch stable ABI
// (torch/csrc/stable, torch/headeronly) built for TORCH_TARGET_VERSION, and
// the Python limited API: one binary loads under every torch release from the
// target on and every CPython from 3.10 on.
#include <Python.h>
#include <torch/csrc/stable/library.h>

#include <string>

#include "cpu/kernels.h"
#ifdef SAVAE_FAST_WITH_CUDA
#include "cuda/kernels.h"
#endif

STABLE_TORCH_LIBRARY(savae_fast, m) {
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

  // In place, for every i with values[i] given: total[i] += values[i].
  // Sums the decoder's parameter gradients over the refinement steps: one call
  // (one parallel region on CPU, one multi-tensor launch per dtype on CUDA) for all
  // parameters instead of one dispatch per parameter.
  m.def("accumulate_(Tensor(a!)[] total, Tensor?[] values) -> ()");
}

namespace {

std::string build_info_json() {
  std::string s = "{";
#ifdef SAVAE_FAST_WITH_CUDA
  s += "\"cuda\": true";
#else
  s += "\"cuda\": false";
#endif
#ifdef SAVAE_FAST_CUDA_ARCHS
  s += ", \"cuda_archs\": \"" SAVAE_FAST_CUDA_ARCHS "\"";
#endif
#ifdef TORCH_TARGET_VERSION
  s += ", \"torch_target_version\": \"" + std::to_string((TORCH_TARGET_VERSION >> 56) & 0xff) + "." +
       std::to_string((TORCH_TARGET_VERSION >> 48) & 0xff) + "\"";
#endif
  s += ", \"compiler\": \"" __VERSION__ "\"";
  s += std::string(", \"cpu_vector_kernels\": ") + (savae_fast::cpu::vector_kernels_compiled() ? "true" : "false");
  return s + "}";
}

}  // namespace

// A small C interface for what is not an operator (read with ctypes by
// savae_fast/ops/extension.py): how the extension was built, the switch
// between the AVX2 and portable CPU loops, and the size limit of the one-block
// CUDA reductions.
#define SAVAE_FAST_C_API extern "C" __attribute__((visibility("default")))

SAVAE_FAST_C_API const char* savae_fast_build_info() {
  static const std::string info = build_info_json();
  return info.c_str();
}

SAVAE_FAST_C_API int savae_fast_cpu_vector_kernels() { return savae_fast::cpu::vector_kernels_enabled() ? 1 : 0; }

// 0 on success, -1 when the AVX2 loops were asked for but are not available.
SAVAE_FAST_C_API int savae_fast_set_cpu_vector_kernels(int enabled) {
  if (enabled && !savae_fast::cpu::vector_kernels_compiled()) return -1;
  savae_fast::cpu::set_vector_kernels(enabled != 0);
  return 0;
}

#ifdef SAVAE_FAST_WITH_CUDA
// Up to how many elements forward_step / reverse_direction run as one launch of one block.
SAVAE_FAST_C_API int64_t savae_fast_cuda_single_block_max_elements() {
  return savae_fast::cuda::single_block_max_elements();
}
SAVAE_FAST_C_API void savae_fast_set_cuda_single_block_max_elements(int64_t numel) {
  savae_fast::cuda::set_single_block_max_elements(numel);
}
#endif

// Importing savae_fast._C loads this library, whose static initialisers register
// the operators; the module itself is empty.
extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                      "Compiled kernels of savae_fast (operators under torch.ops.savae_fast)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
