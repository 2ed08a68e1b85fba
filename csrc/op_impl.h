// The savae_fast:: operators, written once for every backend on the LibTorch
// stable ABI: argument checks (named in every message), output allocation and
// the filling of the parameter structs of op_params.h. A backend (CpuBackend in
// csrc/cpu/refine_cpu.cpp, CudaBackend in csrc/cuda/refine_cuda.cpp) supplies
// the device work:
//
//   struct Backend {
//     static constexpr const char* kName;         // "CPU", "CUDA": the dispatch key
//     static int64_t partials_rows(int64_t numel); // rows of the [k, 2] reduction workspace (0: none)
//     static bool on_device(const torch::stable::Tensor&);  // a tensor this backend's kernels can read
//     struct Guard { explicit Guard(const torch::stable::Tensor&); };  // current device
//     template <typename T> static void sample(const SampleParams<T>&);
//     template <typename T> static void forward_step(const ForwardStepParams<T>&);
//     template <typename T> static void reverse_direction(const ReverseDirectionParams<T>&);
//     template <typename T> static void reverse_update(const ReverseUpdateParams<T>&);
//     static void accumulate(ScalarType, const std::vector<AccumulateItem>&);  // one dtype
//   };
//
// Registered for a dispatch key by register_backend<Backend> (end of this file);
// the schemas are in csrc/ops.cpp.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "op_params.h"
#include "savae_math.h"

namespace savae_fast {
namespace ops {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// ------------------------------------------------------------- messages
inline std::string shape_str(const Tensor& t) {
  std::ostringstream s;
  s << "[";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << "]";
  return s.str();
}

inline std::string device_str(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  std::ostringstream s;
  s << (t.is_cuda() ? "cuda" : "device") << ":" << int(t.get_device_index());
  return s.str();
}

inline std::string dtype_str(ScalarType t) { return torch::headeronly::toString(t); }

inline bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t i = 0; i < a.dim(); ++i)
    if (a.size(i) != b.size(i)) return false;
  return true;
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.is_cpu() == b.is_cpu() && a.is_cuda() == b.is_cuda() && a.get_device_index() == b.get_device_index();
}

// Uninitialised contiguous tensor of `like`'s dtype and device. Straight to the
// C shim's empty_strided: torch::stable::empty_like / new_empty go through the
// boxed dispatcher, a microsecond each, and an operator allocates up to 8 outputs.
inline Tensor empty_as(const Tensor& like, std::initializer_list<int64_t> sizes) {
  int64_t size[3], stride[3];
  const int ndim = int(sizes.size());
  int i = 0;
  for (int64_t v : sizes) size[i++] = v;
  int64_t st = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    stride[d] = st;
    st *= size[d];
  }
  int32_t dtype, device_type, device_index;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_dtype(like.get(), &dtype));
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(like.get(), &device_index));
  AtenTensorHandle out = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(ndim, size, stride, dtype, device_type, device_index, &out));
  return Tensor(out);
}

// Contiguous input without a dispatcher call when it already is (the common case).
inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// ------------------------------------------------------------- checks
// Contiguous copies of the N [B, D] inputs of one op call, in argument order, all
// checked to share shape, dtype (float32/float64) and device with the first one.
template <size_t N>
struct MatrixArgs {
  std::array<Tensor, N> t;
  int64_t rows = 0;
  int64_t cols = 0;
  ScalarType dtype = ScalarType::Float;

  const Tensor& first() const { return t[0]; }
};

template <size_t N>
MatrixArgs<N> check_matrices(const char* op, const std::array<std::pair<const char*, const Tensor*>, N>& args) {
  MatrixArgs<N> out;
  const Tensor& first = *args[0].second;
  const char* first_name = args[0].first;
  for (size_t i = 0; i < N; ++i) {
    const auto& [name, xp] = args[i];
    const Tensor& x = *xp;
    STD_TORCH_CHECK(x.defined(), "savae_fast::", op, ": argument '", name, "' is undefined");
    const ScalarType dt = x.scalar_type();
    if (i == 0) {
      STD_TORCH_CHECK(x.dim() == 2, "savae_fast::", op, ": argument '", name,
                      "' must be a 2-D [batch, latent] tensor, got shape ", shape_str(x));
      STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Double, "savae_fast::", op, ": argument '",
                      name, "' must be float32 or float64, got ", dtype_str(dt));
      out.dtype = dt;
    } else {
      STD_TORCH_CHECK(same_shape(x, first), "savae_fast::", op, ": argument '", name, "' has shape ", shape_str(x),
                      " but '", first_name, "' has shape ", shape_str(first));
      STD_TORCH_CHECK(dt == out.dtype, "savae_fast::", op, ": argument '", name, "' has dtype ", dtype_str(dt),
                      " but '", first_name, "' has dtype ", dtype_str(out.dtype));
      STD_TORCH_CHECK(same_device(x, first), "savae_fast::", op, ": argument '", name, "' is on ", device_str(x),
                      " but '", first_name, "' is on ", device_str(first));
    }
    out.t[i] = as_contiguous(x);
  }
  out.rows = first.size(0);
  out.cols = first.size(1);
  return out;
}

// An optional [B, D] input like the others (nullopt or undefined: absent).
template <size_t N>
std::optional<Tensor> check_optional_like(const char* op, const char* name, const std::optional<Tensor>& x,
                                          const MatrixArgs<N>& m) {
  if (!x.has_value() || !x->defined()) return std::nullopt;
  STD_TORCH_CHECK(same_shape(*x, m.first()), "savae_fast::", op, ": argument '", name, "' has shape ", shape_str(*x),
                  ", expected ", shape_str(m.first()));
  STD_TORCH_CHECK(x->scalar_type() == m.dtype, "savae_fast::", op, ": argument '", name, "' has dtype ",
                  dtype_str(x->scalar_type()), ", expected ", dtype_str(m.dtype));
  STD_TORCH_CHECK(same_device(*x, m.first()), "savae_fast::", op, ": argument '", name, "' is on ", device_str(*x),
                  ", expected ", device_str(m.first()));
  return as_contiguous(*x);
}

template <size_t N>
Tensor check_grad_norms(const char* op, const Tensor& x, const MatrixArgs<N>& m) {
  STD_TORCH_CHECK(x.defined() && x.dim() == 1 && x.numel() == 2, "savae_fast::", op,
                  ": argument 'grad_norms' must have shape [2], got ", x.defined() ? shape_str(x) : "[]");
  STD_TORCH_CHECK(x.scalar_type() == m.dtype, "savae_fast::", op, ": argument 'grad_norms' has dtype ",
                  dtype_str(x.scalar_type()), ", expected ", dtype_str(m.dtype));
  STD_TORCH_CHECK(same_device(x, m.first()), "savae_fast::", op, ": argument 'grad_norms' is on ", device_str(x),
                  ", expected ", device_str(m.first()));
  return as_contiguous(x);
}

inline void check_finite(const char* op, std::initializer_list<std::pair<const char*, double>> scalars) {
  for (const auto& [name, v] : scalars)
    STD_TORCH_CHECK(std::isfinite(v), "savae_fast::", op, ": argument '", name, "' must be finite, got ", v);
}

inline math::FdMode check_fd_mode(const char* op, int64_t mode) {
  STD_TORCH_CHECK(mode >= math::kExact && mode <= math::kCentral, "savae_fast::", op,
                  ": argument 'fd_mode' must be 0 (exact), 1 (forward) or 2 (central), got ", mode);
  return math::FdMode(mode);
}

template <class Backend>
void check_backend_device(const char* op, const Tensor& t) {
  STD_TORCH_CHECK(Backend::on_device(t), "savae_fast::", op, ": ", Backend::kName, " kernel called with tensors on ",
                  device_str(t));
}

// Calls f(T{}) with T the C++ type of a float32 / float64 dtype.
template <class F>
void dispatch_float(const char* op, ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::Float:
      return f(float{});
    case ScalarType::Double:
      return f(double{});
    default:
      STD_TORCH_CHECK(false, "savae_fast::", op, ": unsupported dtype ", dtype_str(dtype));
  }
}

template <typename T>
const T* cptr(const Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(const Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

template <typename T>
StepScalars<T> step_scalars(double scale, double kl_weight, double lr_mu, double lr_logvar, double momentum,
                            double max_grad_norm) {
  return {T(scale), T(kl_weight), T(lr_mu), T(lr_logvar), T(momentum), T(max_grad_norm)};
}

// The reductions' workspace where the backend needs one for this size (two-launch
// CUDA reductions); none (no allocation) on CPU and for small CUDA tensors.
template <class Backend, size_t N>
std::optional<Tensor> partials_workspace(const MatrixArgs<N>& m) {
  const int64_t rows = Backend::partials_rows(m.rows * m.cols);
  if (rows == 0) return std::nullopt;
  return empty_as(m.first(), {rows, 2});
}

// ------------------------------------------------------------- operators
// z = mu + exp(logvar / 2) * eps
template <class Backend>
Tensor sample(const Tensor& mu, const Tensor& logvar, const Tensor& eps) {
  const char* op = "sample";
  const auto m = check_matrices<3>(op, {{{"mu", &mu}, {"logvar", &logvar}, {"eps", &eps}}});
  const auto& [x_mu, x_logvar, x_eps] = m.t;
  check_backend_device<Backend>(op, x_mu);
  const typename Backend::Guard guard(x_mu);
  Tensor z = empty_as(x_mu, {m.rows, m.cols});
  dispatch_float(op, m.dtype, [&](auto zero) {
    using T = decltype(zero);
    Backend::sample(SampleParams<T>{m.rows * m.cols, cptr<T>(x_mu), cptr<T>(x_logvar), cptr<T>(x_eps), mptr<T>(z)});
  });
  return z;
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward_step(
    const Tensor& mu, const Tensor& logvar, const Tensor& p_mu, const Tensor& p_logvar, const Tensor& eps,
    const Tensor& grad_z, const std::optional<Tensor>& eps_next, double scale, double kl_weight, double lr_mu,
    double lr_logvar, double momentum, double max_grad_norm) {
  const char* op = "forward_step";
  const auto m = check_matrices<6>(op, {{{"mu", &mu}, {"logvar", &logvar}, {"p_mu", &p_mu},
                                         {"p_logvar", &p_logvar}, {"eps", &eps}, {"grad_z", &grad_z}}});
  const auto& [x_mu, x_logvar, x_p_mu, x_p_logvar, x_eps, x_grad_z] = m.t;
  check_backend_device<Backend>(op, m.first());
  const std::optional<Tensor> en = check_optional_like(op, "eps_next", eps_next, m);
  check_finite(op, {{"scale", scale}, {"kl_weight", kl_weight}, {"lr_mu", lr_mu}, {"lr_logvar", lr_logvar},
                    {"momentum", momentum}, {"max_grad_norm", max_grad_norm}});
  const typename Backend::Guard guard(m.first());
  Tensor mu_n = empty_as(m.first(), {m.rows, m.cols}), lv_n = empty_as(m.first(), {m.rows, m.cols});
  Tensor pm_n = empty_as(m.first(), {m.rows, m.cols}), pl_n = empty_as(m.first(), {m.rows, m.cols});
  Tensor z_n = en ? empty_as(m.first(), {m.rows, m.cols}) : empty_as(m.first(), {0});
  Tensor norms = empty_as(m.first(), {2});
  const auto partials = partials_workspace<Backend>(m);
  dispatch_float(op, m.dtype, [&](auto zero) {
    using T = decltype(zero);
    Backend::forward_step(ForwardStepParams<T>{
        m.rows, m.cols, cptr<T>(x_mu), cptr<T>(x_logvar), cptr<T>(x_p_mu), cptr<T>(x_p_logvar), cptr<T>(x_eps),
        cptr<T>(x_grad_z), en ? cptr<T>(*en) : nullptr, mptr<T>(mu_n), mptr<T>(lv_n), mptr<T>(pm_n), mptr<T>(pl_n),
        en ? mptr<T>(z_n) : nullptr, mptr<T>(norms), partials ? mptr<T>(*partials) : nullptr,
        step_scalars<T>(scale, kl_weight, lr_mu, lr_logvar, momentum, max_grad_norm)});
  });
  return {mu_n, lv_n, pm_n, pl_n, z_n, norms};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> reverse_direction(
    const Tensor& lbar_mu, const Tensor& lbar_logvar, const Tensor& pbar_mu, const Tensor& pbar_logvar,
    const Tensor& mu, const Tensor& logvar, const Tensor& eps, const Tensor& grad_z, const Tensor& grad_norms,
    double scale, double kl_weight, double lr_mu, double lr_logvar, double max_grad_norm, int64_t fd_mode,
    double fd_step) {
  const char* op = "reverse_direction";
  const auto m = check_matrices<8>(op, {{{"lbar_mu", &lbar_mu}, {"lbar_logvar", &lbar_logvar},
                                         {"pbar_mu", &pbar_mu}, {"pbar_logvar", &pbar_logvar}, {"mu", &mu},
                                         {"logvar", &logvar}, {"eps", &eps}, {"grad_z", &grad_z}}});
  const auto& [x_lbar_mu, x_lbar_logvar, x_pbar_mu, x_pbar_logvar, x_mu, x_logvar, x_eps, x_grad_z] = m.t;
  check_backend_device<Backend>(op, m.first());
  const Tensor norms = check_grad_norms(op, grad_norms, m);
  const math::FdMode mode = check_fd_mode(op, fd_mode);
  check_finite(op, {{"scale", scale}, {"kl_weight", kl_weight}, {"lr_mu", lr_mu}, {"lr_logvar", lr_logvar},
                    {"max_grad_norm", max_grad_norm}, {"fd_step", fd_step}});
  const typename Backend::Guard guard(m.first());
  const int64_t n_eval = math::num_eval_points(mode);
  Tensor pbm_n = empty_as(m.first(), {m.rows, m.cols}), pbl_n = empty_as(m.first(), {m.rows, m.cols});
  Tensor v_mu = empty_as(m.first(), {m.rows, m.cols}), v_lv = empty_as(m.first(), {m.rows, m.cols});
  Tensor u = empty_as(m.first(), {m.rows, m.cols});
  Tensor z_eval = empty_as(m.first(), {n_eval, m.rows, m.cols});
  Tensor row_weight = empty_as(m.first(), {m.rows});
  const auto partials = partials_workspace<Backend>(m);
  dispatch_float(op, m.dtype, [&](auto zero) {
    using T = decltype(zero);
    Backend::reverse_direction(ReverseDirectionParams<T>{
        m.rows, m.cols, cptr<T>(x_lbar_mu), cptr<T>(x_lbar_logvar), cptr<T>(x_pbar_mu), cptr<T>(x_pbar_logvar),
        cptr<T>(x_mu), cptr<T>(x_logvar), cptr<T>(x_eps), cptr<T>(x_grad_z), cptr<T>(norms), mptr<T>(pbm_n), mptr<T>(pbl_n), mptr<T>(v_mu), mptr<T>(v_lv),
        mptr<T>(u), mptr<T>(z_eval), mptr<T>(row_weight), partials ? mptr<T>(*partials) : nullptr,
        step_scalars<T>(scale, kl_weight, lr_mu, lr_logvar, 0.0, max_grad_norm), mode, T(fd_step)});
  });
  return {pbm_n, pbl_n, v_mu, v_lv, u, z_eval, row_weight};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor> reverse_update(
    const Tensor& lbar_mu, const Tensor& lbar_logvar, const Tensor& pbar_mu, const Tensor& pbar_logvar,
    const Tensor& v_mu, const Tensor& v_logvar, const Tensor& logvar, const Tensor& eps, const Tensor& grad_z,
    const Tensor& hvp_a, const std::optional<Tensor>& hvp_b, double hvp_scale, double scale, double kl_weight,
    double momentum) {
  const char* op = "reverse_update";
  const auto m = check_matrices<10>(op, {{{"lbar_mu", &lbar_mu}, {"lbar_logvar", &lbar_logvar},
                                          {"pbar_mu", &pbar_mu}, {"pbar_logvar", &pbar_logvar}, {"v_mu", &v_mu},
                                          {"v_logvar", &v_logvar}, {"logvar", &logvar}, {"eps", &eps},
                                          {"grad_z", &grad_z}, {"hvp_a", &hvp_a}}});
  const auto& [x_lbar_mu, x_lbar_logvar, x_pbar_mu, x_pbar_logvar, x_v_mu, x_v_logvar, x_logvar, x_eps, x_grad_z,
               x_hvp_a] = m.t;
  check_backend_device<Backend>(op, m.first());
  const std::optional<Tensor> hb = check_optional_like(op, "hvp_b", hvp_b, m);
  check_finite(op, {{"hvp_scale", hvp_scale}, {"scale", scale}, {"kl_weight", kl_weight}, {"momentum", momentum}});
  const typename Backend::Guard guard(m.first());
  Tensor lbm_n = empty_as(m.first(), {m.rows, m.cols}), lbl_n = empty_as(m.first(), {m.rows, m.cols});
  Tensor pbm_n = empty_as(m.first(), {m.rows, m.cols}), pbl_n = empty_as(m.first(), {m.rows, m.cols});
  dispatch_float(op, m.dtype, [&](auto zero) {
    using T = decltype(zero);
    Backend::reverse_update(ReverseUpdateParams<T>{
        m.rows * m.cols, cptr<T>(x_lbar_mu), cptr<T>(x_lbar_logvar), cptr<T>(x_pbar_mu), cptr<T>(x_pbar_logvar),
        cptr<T>(x_v_mu), cptr<T>(x_v_logvar), cptr<T>(x_logvar), cptr<T>(x_eps), cptr<T>(x_grad_z), cptr<T>(x_hvp_a),
        hb ? cptr<T>(*hb) : nullptr,
        mptr<T>(lbm_n), mptr<T>(lbl_n), mptr<T>(pbm_n), mptr<T>(pbl_n), T(hvp_scale),
        step_scalars<T>(scale, kl_weight, 0.0, 0.0, momentum, 0.0)});
  });
  return {lbm_n, lbl_n, pbm_n, pbl_n};
}

// In place, for every i with values[i] given: total[i] += values[i]. Lists of
// equal length; total[i] floating point and contiguous; values[i] of total[i]'s
// shape, dtype and device.
template <class Backend>
void accumulate_(std::vector<Tensor> total, std::vector<std::optional<Tensor>> values) {
  const char* op = "accumulate_";
  STD_TORCH_CHECK(total.size() == values.size(), "savae_fast::", op,
                  ": arguments 'total' and 'values' must have the same length, got ", total.size(), " and ",
                  values.size());
  // Items grouped by dtype, in list order within a dtype.
  std::vector<std::pair<ScalarType, std::vector<AccumulateItem>>> groups;
  std::vector<Tensor> keep;  // contiguous copies of non-contiguous values, alive until the work is queued
  keep.reserve(values.size());
  const Tensor* any = nullptr;
  for (size_t i = 0; i < total.size(); ++i) {
    const Tensor& t = total[i];
    STD_TORCH_CHECK(t.defined(), "savae_fast::", op, ": 'total'[", i, "] is undefined");
    const ScalarType dt = t.scalar_type();
    STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Double || dt == ScalarType::Half ||
                        dt == ScalarType::BFloat16,
                    "savae_fast::", op, ": 'total'[", i, "] must be floating point, got ", dtype_str(dt));
    STD_TORCH_CHECK(t.is_contiguous(), "savae_fast::", op, ": 'total'[", i,
                    "] must be contiguous (it is written in place)");
    const std::optional<Tensor>& v = values[i];
    if (!v.has_value() || !v->defined()) continue;
    STD_TORCH_CHECK(same_shape(*v, t) && v->scalar_type() == dt && same_device(*v, t), "savae_fast::", op,
                    ": 'values'[", i, "] must match 'total'[", i, "] (shape ", shape_str(t), ", ", dtype_str(dt),
                    ", ", device_str(t), "), got shape ", shape_str(*v), ", ", dtype_str(v->scalar_type()), ", ",
                    device_str(*v));
    check_backend_device<Backend>(op, t);
    if (t.numel() == 0) continue;
    keep.push_back(as_contiguous(*v));
    any = &t;
    auto g = groups.begin();
    while (g != groups.end() && g->first != dt) ++g;
    if (g == groups.end()) g = groups.insert(groups.end(), {dt, {}});
    g->second.push_back({t.mutable_data_ptr(), keep.back().const_data_ptr(), t.numel()});
  }
  if (any == nullptr) return;
  const typename Backend::Guard guard(*any);
  for (const auto& [dtype, items] : groups) Backend::accumulate(dtype, items);
}

// Every operator of the library for one backend's dispatch key.
template <class Backend>
void register_backend(torch::stable::detail::StableLibrary& m) {
  m.impl("sample", TORCH_BOX(&sample<Backend>));
  m.impl("forward_step", TORCH_BOX(&forward_step<Backend>));
  m.impl("reverse_direction", TORCH_BOX(&reverse_direction<Backend>));
  m.impl("reverse_update", TORCH_BOX(&reverse_update<Backend>));
  m.impl("accumulate_", TORCH_BOX(&accumulate_<Backend>));
}

}  // namespace ops
}  // namespace savae_fast
