// Operator schemas of the savae_fast:: library (defined once; each backend
// registers its kernels with TORCH_LIBRARY_IMPL in its own file) and the
// Python module entry point of savae_fast._C.
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor casters
#include <torch/library.h>

#include "cpu/kernels.h"

#include <optional>
#include <string>
#include <tuple>
#include <vector>

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

  // In place, for every i with values[i] given: total[i] += values[i].
  // Sums the decoder's parameter gradients over the refinement steps: one call
  // (one parallel region on CPU, ATen's multi-tensor kernel on CUDA) for all
  // parameters instead of one dispatch per parameter.
  m.def("accumulate_(Tensor(a!)[] total, Tensor?[] values) -> ()");
}

namespace {

namespace py = pybind11;
using at::Tensor;

// Unboxed calls of the registered operators, for the refinement loop: the same
// dispatcher entry (device kernels, fake tensors, dispatch modes) as
// torch.ops.savae_fast.*, without boxing every argument through the generic
// Python operator path (a few microseconds per call, a sizeable share of the
// per-step cost on small problems).
template <class Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensor6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensor7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

void bind_unboxed(py::module_& m) {
  auto f = m.def_submodule("unboxed", "Unboxed calls of the savae_fast:: operators (same semantics).");
  f.def(
      "sample",
      [](const Tensor& mu, const Tensor& logvar, const Tensor& eps) {
        static auto op = typed_op<Tensor(const Tensor&, const Tensor&, const Tensor&)>("savae_fast::sample");
        return op.call(mu, logvar, eps);
      },
      py::call_guard<py::gil_scoped_release>());
  f.def(
      "forward_step",
      [](const Tensor& mu, const Tensor& logvar, const Tensor& p_mu, const Tensor& p_logvar, const Tensor& eps,
         const Tensor& grad_z, const std::optional<Tensor>& eps_next, double scale, double kl_weight, double lr_mu,
         double lr_logvar, double momentum, double max_grad_norm) {
        static auto op = typed_op<Tensor6(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, const std::optional<Tensor>&, double, double, double,
                                          double, double, double)>("savae_fast::forward_step");
        return op.call(mu, logvar, p_mu, p_logvar, eps, grad_z, eps_next, scale, kl_weight, lr_mu, lr_logvar,
                       momentum, max_grad_norm);
      },
      py::call_guard<py::gil_scoped_release>());
  f.def(
      "reverse_direction",
      [](const Tensor& lbar_mu, const Tensor& lbar_logvar, const Tensor& pbar_mu, const Tensor& pbar_logvar,
         const Tensor& mu, const Tensor& logvar, const Tensor& eps, const Tensor& grad_z, const Tensor& grad_norms,
         double scale, double kl_weight, double lr_mu, double lr_logvar, double max_grad_norm, int64_t fd_mode,
         double fd_step) {
        static auto op = typed_op<Tensor7(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, double,
                                          double, double, double, int64_t, double)>("savae_fast::reverse_direction");
        return op.call(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, mu, logvar, eps, grad_z, grad_norms, scale,
                       kl_weight, lr_mu, lr_logvar, max_grad_norm, fd_mode, fd_step);
      },
      py::call_guard<py::gil_scoped_release>());
  f.def(
      "reverse_update",
      [](const Tensor& lbar_mu, const Tensor& lbar_logvar, const Tensor& pbar_mu, const Tensor& pbar_logvar,
         const Tensor& v_mu, const Tensor& v_logvar, const Tensor& logvar, const Tensor& eps, const Tensor& grad_z,
         const Tensor& hvp_a, const std::optional<Tensor>& hvp_b, double hvp_scale, double scale, double kl_weight,
         double momentum) {
        static auto op = typed_op<Tensor4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          const std::optional<Tensor>&, double, double, double, double)>(
            "savae_fast::reverse_update");
        return op.call(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, v_mu, v_logvar, logvar, eps, grad_z, hvp_a, hvp_b,
                       hvp_scale, scale, kl_weight, momentum);
      },
      py::call_guard<py::gil_scoped_release>());
  f.def(
      "accumulate_",
      [](std::vector<Tensor> total, const std::vector<std::optional<Tensor>>& values) {
        static auto op =
            typed_op<void(at::TensorList, const c10::List<std::optional<Tensor>>&)>("savae_fast::accumulate_");
        c10::List<std::optional<Tensor>> vals;
        vals.reserve(values.size());
        for (const auto& v : values) vals.push_back(v);
        op.call(total, vals);
      },
      py::call_guard<py::gil_scoped_release>());
}

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
  info["cpu_vector_kernels"] = savae_fast::cpu::vector_kernels_compiled();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled kernels of savae_fast (operators are registered under torch.ops.savae_fast)";
  m.def("build_info", &build_info, "How this extension was built.");
  m.def("cpu_vector_kernels", &savae_fast::cpu::vector_kernels_enabled,
        "Whether the CPU operators use their AVX2 (vectorised) build.");
  m.def("set_cpu_vector_kernels", &savae_fast::cpu::set_vector_kernels, py::arg("enabled"),
        "Use the AVX2 (True) or the portable (False) build of the CPU loops.");
  bind_unboxed(m);
}
