// Argument checking and output allocation shared by every backend of the
// savae_fast:: operators (CPU kernels in csrc/cpu, CUDA kernels in csrc/cuda).
// Host-only, depends on ATen but not on CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>
#include <vector>

namespace savae_fast {

// Contiguous copies of the [B, D] inputs of one op call, all checked to
// share shape, dtype (float32/float64) and device with the first one.
struct MatrixArgs {
  std::vector<at::Tensor> t;
  int64_t rows = 0;
  int64_t cols = 0;

  const at::Tensor& operator[](size_t i) const { return t[i]; }
  at::ScalarType dtype() const { return t[0].scalar_type(); }
};

inline MatrixArgs check_matrices(const char* op,
                                 std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  MatrixArgs out;
  const at::Tensor* first = nullptr;
  const char* first_name = nullptr;
  for (const auto& a : args) {
    const char* name = a.first;
    const at::Tensor& x = *a.second;
    TORCH_CHECK(x.defined(), "savae_fast::", op, ": argument '", name, "' is undefined");
    if (first == nullptr) {
      TORCH_CHECK(x.dim() == 2, "savae_fast::", op, ": argument '", name,
                  "' must be a 2-D [batch, latent] tensor, got shape ", x.sizes());
      TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                  "savae_fast::", op, ": argument '", name,
                  "' must be float32 or float64, got ", x.scalar_type());
      first = &x;
      first_name = name;
    } else {
      TORCH_CHECK(x.sizes() == first->sizes(), "savae_fast::", op, ": argument '", name,
                  "' has shape ", x.sizes(), " but '", first_name, "' has shape ",
                  first->sizes());
      TORCH_CHECK(x.scalar_type() == first->scalar_type(), "savae_fast::", op,
                  ": argument '", name, "' has dtype ", x.scalar_type(), " but '",
                  first_name, "' has dtype ", first->scalar_type());
      TORCH_CHECK(x.device() == first->device(), "savae_fast::", op, ": argument '", name,
                  "' is on ", x.device(), " but '", first_name, "' is on ",
                  first->device());
    }
    out.t.push_back(x.contiguous());
  }
  out.rows = first->size(0);
  out.cols = first->size(1);
  return out;
}

inline at::Tensor check_like(const char* op, const char* name, const at::Tensor& x,
                             const MatrixArgs& m) {
  TORCH_CHECK(x.defined(), "savae_fast::", op, ": argument '", name, "' is undefined");
  TORCH_CHECK(x.sizes() == m[0].sizes(), "savae_fast::", op, ": argument '", name,
              "' has shape ", x.sizes(), ", expected ", m[0].sizes());
  TORCH_CHECK(x.scalar_type() == m.dtype(), "savae_fast::", op, ": argument '", name,
              "' has dtype ", x.scalar_type(), ", expected ", m.dtype());
  TORCH_CHECK(x.device() == m[0].device(), "savae_fast::", op, ": argument '", name,
              "' is on ", x.device(), ", expected ", m[0].device());
  return x.contiguous();
}

inline at::Tensor check_grad_norms(const char* op, const at::Tensor& x, const MatrixArgs& m) {
  TORCH_CHECK(x.defined() && x.dim() == 1 && x.numel() == 2, "savae_fast::", op,
              ": argument 'grad_norms' must have shape [2], got ",
              x.defined() ? x.sizes() : at::IntArrayRef{});
  TORCH_CHECK(x.scalar_type() == m.dtype(), "savae_fast::", op,
              ": argument 'grad_norms' has dtype ", x.scalar_type(), ", expected ", m.dtype());
  TORCH_CHECK(x.device() == m[0].device(), "savae_fast::", op,
              ": argument 'grad_norms' is on ", x.device(), ", expected ", m[0].device());
  return x.contiguous();
}

inline void check_finite_scalar(const char* op, const char* name, double v) {
  TORCH_CHECK(std::isfinite(v), "savae_fast::", op, ": argument '", name,
              "' must be finite, got ", v);
}

inline void check_fd_mode(const char* op, int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "savae_fast::", op,
              ": argument 'fd_mode' must be 0 (exact), 1 (forward) or 2 (central), got ", mode);
}

// accumulate_: lists of equal length; total[i] floating point and contiguous;
// values[i] (when given) of total[i]'s shape, dtype and device.
inline void check_accumulate_lists(at::TensorList total, const c10::List<std::optional<at::Tensor>>& values) {
  const char* op = "accumulate_";
  TORCH_CHECK(total.size() == values.size(), "savae_fast::", op,
              ": arguments 'total' and 'values' must have the same length, got ", total.size(), " and ",
              values.size());
  for (size_t i = 0; i < total.size(); ++i) {
    const at::Tensor& t = total[i];
    TORCH_CHECK(t.defined(), "savae_fast::", op, ": 'total'[", i, "] is undefined");
    TORCH_CHECK(t.is_floating_point(), "savae_fast::", op, ": 'total'[", i, "] must be floating point, got ",
                t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "savae_fast::", op, ": 'total'[", i, "] must be contiguous (it is written in place)");
    const std::optional<at::Tensor> v = values.get(i);
    if (!v.has_value() || !v->defined()) continue;
    TORCH_CHECK(v->sizes() == t.sizes() && v->scalar_type() == t.scalar_type() && v->device() == t.device(),
                "savae_fast::", op, ": 'values'[", i, "] must match 'total'[", i, "] (shape ", t.sizes(), ", ",
                t.scalar_type(), ", ", t.device(), "), got shape ", v->sizes(), ", ", v->scalar_type(), ", ",
                v->device());
  }
}

// Number of decoder evaluation points prepared by reverse_direction.
inline int64_t num_eval_points(int64_t fd_mode) { return fd_mode == 2 ? 2 : 1; }

}  // namespace savae_fast
