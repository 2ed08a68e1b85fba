// CPU registrations of the savae_fast:: operators: argument checks, output
// allocation, threading and the scalar per-tensor / per-row work; the loops
// are those of kernels.h, in their AVX2 build (kernels_avx2.cpp) when the CPU
// supports it, else their portable build (instantiated here).
//
// Rows (examples) are split across threads with at::parallel_for; whole-tensor
// reductions (clip norms, clip-Jacobian dot products) are summed per row and
// then over rows in order, so results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "../op_common.h"
#include "../savae_math.h"
#include "kernels.h"

namespace savae_fast {
namespace {

using math::FdMode;

// Rows per task: keep tiny problems on one thread (spawning costs more than the work).
inline int64_t row_grain(int64_t cols) {
  constexpr int64_t kElementsPerTask = 1 << 14;
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, cols));
}

// ------------------------------------------------------------ kernel choice
bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

std::atomic<bool>& vector_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("SAVAE_FAST_CPU_VECTOR");
    return cpu_has_avx2() && cpu::avx2_table_float() != nullptr && !(env && std::string(env) == "0");
  }()};
  return flag;
}

template <typename T>
const cpu::KernelTable<T>& kernels();

template <>
const cpu::KernelTable<float>& kernels<float>() {
  static const cpu::KernelTable<float> portable = cpu::Loops<float, float>::table();
  return vector_flag().load() ? *cpu::avx2_table_float() : portable;
}

template <>
const cpu::KernelTable<double>& kernels<double>() {
  static const cpu::KernelTable<double> portable = cpu::Loops<double, double>::table();
  return vector_flag().load() ? *cpu::avx2_table_double() : portable;
}

// Sum of per-row partials in row order: independent of the number of threads.
std::pair<double, double> ordered_sum(const std::vector<double>& part, int64_t rows) {
  double a = 0, b = 0;
  for (int64_t r = 0; r < rows; ++r) {
    a += part[2 * r];
    b += part[2 * r + 1];
  }
  return {a, b};
}

// ---------------------------------------------------------------- sample
at::Tensor sample_cpu(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps) {
  auto m = check_matrices("sample", {{"mu", &mu}, {"logvar", &logvar}, {"eps", &eps}});
  at::Tensor z = at::empty_like(m[0]);
  const int64_t n = m[0].numel();
  AT_DISPATCH_FLOATING_TYPES(m.dtype(), "savae_fast::sample", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const T *pm = m[0].data_ptr<T>(), *pl = m[1].data_ptr<T>(), *pe = m[2].data_ptr<T>();
    T* pz = z.data_ptr<T>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) { k.sample(pm, pl, pe, pz, i0, i1); });
  });
  return z;
}

// ---------------------------------------------------------- forward_step
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
forward_step_cpu(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& p_mu,
                 const at::Tensor& p_logvar, const at::Tensor& eps, const at::Tensor& grad_z,
                 const c10::optional<at::Tensor>& eps_next, double scale, double kl_weight,
                 double lr_mu, double lr_logvar, double momentum, double max_grad_norm) {
  const char* op = "forward_step";
  auto m = check_matrices(op, {{"mu", &mu}, {"logvar", &logvar}, {"p_mu", &p_mu},
                               {"p_logvar", &p_logvar}, {"eps", &eps}, {"grad_z", &grad_z}});
  const bool has_next = eps_next.has_value() && eps_next->defined();
  at::Tensor en = has_next ? check_like(op, "eps_next", *eps_next, m) : at::Tensor();
  for (auto [name, v] : {std::pair{"scale", scale}, {"kl_weight", kl_weight}, {"lr_mu", lr_mu},
                         {"lr_logvar", lr_logvar}, {"momentum", momentum},
                         {"max_grad_norm", max_grad_norm}})
    check_finite_scalar(op, name, v);

  const int64_t B = m.rows, D = m.cols;
  at::Tensor mu_n = at::empty_like(m[0]), lv_n = at::empty_like(m[0]);
  at::Tensor pm_n = at::empty_like(m[0]), pl_n = at::empty_like(m[0]);
  at::Tensor z_n = has_next ? at::empty_like(m[0]) : at::empty({0}, m[0].options());
  at::Tensor norms = at::empty({2}, m[0].options());

  AT_DISPATCH_FLOATING_TYPES(m.dtype(), "savae_fast::forward_step", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const T *x_mu = m[0].data_ptr<T>(), *x_lv = m[1].data_ptr<T>(), *x_pm = m[2].data_ptr<T>(),
            *x_pl = m[3].data_ptr<T>(), *x_e = m[4].data_ptr<T>(), *x_gz = m[5].data_ptr<T>();
    const T* x_en = has_next ? en.data_ptr<T>() : nullptr;
    T *o_mu = mu_n.data_ptr<T>(), *o_lv = lv_n.data_ptr<T>(), *o_pm = pm_n.data_ptr<T>(), *o_pl = pl_n.data_ptr<T>();
    T* o_z = has_next ? z_n.data_ptr<T>() : nullptr;

    // Pass 1: g_mu, g_logvar (kept in the momentum outputs until pass 2) and their
    // squared norms per row; pass 2: clipped momentum step and the next sample.
    std::vector<double> part(2 * B);
    at::parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
      k.grad_sq_rows(x_gz, x_mu, x_lv, x_e, T(scale), T(kl_weight), o_pm, o_pl, part.data(), b0, b1, D);
    });
    const auto [sm, sl] = ordered_sum(part, B);
    const T n_mu = T(std::sqrt(sm)), n_lv = T(std::sqrt(sl));
    norms.data_ptr<T>()[0] = n_mu;
    norms.data_ptr<T>()[1] = n_lv;
    const T c_mu = math::clip_coef(n_mu, T(max_grad_norm)), c_lv = math::clip_coef(n_lv, T(max_grad_norm));
    at::parallel_for(0, B * D, 1 << 14, [&](int64_t i0, int64_t i1) {
      k.forward_update(x_mu, x_lv, x_pm, x_pl, x_en, c_mu, c_lv, T(lr_mu), T(lr_logvar), T(momentum), o_mu, o_lv,
                       o_pm, o_pl, o_z, i0, i1);
    });
  });
  return {mu_n, lv_n, pm_n, pl_n, z_n, norms};
}

// ----------------------------------------------------- reverse_direction
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
reverse_direction_cpu(const at::Tensor& lbar_mu, const at::Tensor& lbar_logvar,
                      const at::Tensor& pbar_mu, const at::Tensor& pbar_logvar,
                      const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps,
                      const at::Tensor& grad_z, const at::Tensor& grad_norms, double scale,
                      double kl_weight, double lr_mu, double lr_logvar, double max_grad_norm,
                      int64_t fd_mode, double fd_step) {
  const char* op = "reverse_direction";
  auto m = check_matrices(op, {{"lbar_mu", &lbar_mu}, {"lbar_logvar", &lbar_logvar},
                               {"pbar_mu", &pbar_mu}, {"pbar_logvar", &pbar_logvar},
                               {"mu", &mu}, {"logvar", &logvar}, {"eps", &eps},
                               {"grad_z", &grad_z}});
  const at::Tensor norms = check_grad_norms(op, grad_norms, m);
  check_fd_mode(op, fd_mode);
  for (auto [name, v] : {std::pair{"scale", scale}, {"kl_weight", kl_weight}, {"lr_mu", lr_mu},
                         {"lr_logvar", lr_logvar}, {"max_grad_norm", max_grad_norm},
                         {"fd_step", fd_step}})
    check_finite_scalar(op, name, v);

  const int64_t B = m.rows, D = m.cols;
  const int64_t n_eval = num_eval_points(fd_mode);
  at::Tensor pbm_n = at::empty_like(m[0]), pbl_n = at::empty_like(m[0]);
  at::Tensor v_mu = at::empty_like(m[0]), v_lv = at::empty_like(m[0]);
  at::Tensor u = at::empty_like(m[0]);
  at::Tensor z_eval = at::empty({n_eval, B, D}, m[0].options());
  at::Tensor row_weight = at::empty({B}, m[0].options());

  AT_DISPATCH_FLOATING_TYPES(m.dtype(), "savae_fast::reverse_direction", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const T *x_lbm = m[0].data_ptr<T>(), *x_lbl = m[1].data_ptr<T>(), *x_pbm = m[2].data_ptr<T>(),
            *x_pbl = m[3].data_ptr<T>(), *x_mu = m[4].data_ptr<T>(), *x_lv = m[5].data_ptr<T>(),
            *x_e = m[6].data_ptr<T>(), *x_gz = m[7].data_ptr<T>();
    T *o_pbm = pbm_n.data_ptr<T>(), *o_pbl = pbl_n.data_ptr<T>(), *o_vm = v_mu.data_ptr<T>(),
      *o_vl = v_lv.data_ptr<T>(), *o_u = u.data_ptr<T>(), *o_z = z_eval.data_ptr<T>(), *o_w = row_weight.data_ptr<T>();
    const T M = T(max_grad_norm);
    const T n_mu = norms.data_ptr<T>()[0], n_lv = norms.data_ptr<T>()[1];
    const T c_mu = math::clip_coef(n_mu, M), c_lv = math::clip_coef(n_lv, M);
    const bool clipped = c_mu < T(1) || c_lv < T(1);

    // Pass 1: pbar += lr * lbar, and (only where clipping was active) the dot
    // products g . pbar the clip Jacobian needs.
    std::vector<double> part(2 * B, 0.0);
    at::parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
      k.reverse_dots_rows(x_lbm, x_lbl, x_pbm, x_pbl, x_gz, x_mu, x_lv, x_e, T(scale), T(kl_weight), T(lr_mu),
                          T(lr_logvar), clipped, o_pbm, o_pbl, part.data(), b0, b1, D);
    });
    const auto [dm, dl] = ordered_sum(part, B);
    const T k_mu = math::clip_jacobian_kappa(n_mu, M, T(dm)), k_lv = math::clip_jacobian_kappa(n_lv, M, T(dl));

    // Pass 2 (row-wise): v = J pbar, u, and the evaluation points.
    std::vector<double> uu(B), zz(B);
    const T z_step = fd_mode == FdMode::kForward ? T(fd_step) : T(0);
    at::parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
      k.reverse_rows(o_pbm, o_pbl, x_gz, x_mu, x_lv, x_e, T(scale), T(kl_weight), c_mu, c_lv, k_mu, k_lv, clipped,
                     z_step, o_vm, o_vl, o_u, o_z, uu.data(), zz.data(), b0, b1, D);
    });
    if (fd_mode == FdMode::kCentral) {
      std::vector<T> r(B);
      for (int64_t b = 0; b < B; ++b)
        math::central_step(T(std::sqrt(zz[b])), T(std::sqrt(uu[b])), T(fd_step), &r[b], &o_w[b]);
      at::parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
        k.central_points(o_u, r.data(), o_z, o_z + B * D, b0, b1, D);
      });
    } else {
      for (int64_t b = 0; b < B; ++b) o_w[b] = T(1);
    }
  });
  return {pbm_n, pbl_n, v_mu, v_lv, u, z_eval, row_weight};
}

// -------------------------------------------------------- reverse_update
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reverse_update_cpu(
    const at::Tensor& lbar_mu, const at::Tensor& lbar_logvar, const at::Tensor& pbar_mu,
    const at::Tensor& pbar_logvar, const at::Tensor& v_mu, const at::Tensor& v_logvar,
    const at::Tensor& logvar, const at::Tensor& eps, const at::Tensor& grad_z,
    const at::Tensor& hvp_a, const c10::optional<at::Tensor>& hvp_b, double hvp_scale,
    double scale, double kl_weight, double momentum) {
  const char* op = "reverse_update";
  auto m = check_matrices(op, {{"lbar_mu", &lbar_mu}, {"lbar_logvar", &lbar_logvar},
                               {"pbar_mu", &pbar_mu}, {"pbar_logvar", &pbar_logvar},
                               {"v_mu", &v_mu}, {"v_logvar", &v_logvar}, {"logvar", &logvar},
                               {"eps", &eps}, {"grad_z", &grad_z}, {"hvp_a", &hvp_a}});
  const bool has_b = hvp_b.has_value() && hvp_b->defined();
  at::Tensor hb = has_b ? check_like(op, "hvp_b", *hvp_b, m) : at::Tensor();
  for (auto [name, v] : {std::pair{"hvp_scale", hvp_scale}, {"scale", scale},
                         {"kl_weight", kl_weight}, {"momentum", momentum}})
    check_finite_scalar(op, name, v);

  at::Tensor lbm_n = at::empty_like(m[0]), lbl_n = at::empty_like(m[0]);
  at::Tensor pbm_n = at::empty_like(m[0]), pbl_n = at::empty_like(m[0]);
  const int64_t n = m[0].numel();
  AT_DISPATCH_FLOATING_TYPES(m.dtype(), "savae_fast::reverse_update", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const T* x[10];
    for (int i = 0; i < 10; ++i) x[i] = m[i].data_ptr<T>();
    const T* x_b = has_b ? hb.data_ptr<T>() : nullptr;
    T *o_lbm = lbm_n.data_ptr<T>(), *o_lbl = lbl_n.data_ptr<T>(), *o_pbm = pbm_n.data_ptr<T>(),
      *o_pbl = pbl_n.data_ptr<T>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
      k.reverse_update(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8], x[9], x_b, T(hvp_scale), T(scale),
                       T(kl_weight), T(momentum), o_lbm, o_lbl, o_pbm, o_pbl, i0, i1);
    });
  });
  return {lbm_n, lbl_n, pbm_n, pbl_n};
}

// ------------------------------------------------------------ accumulate_
// Plain functions with restrict-qualified parameters (not a lambda capture) so
// that the compiler vectorises the loop; float/double are compiled for AVX2 and
// baseline x86-64 and picked at load time, as ATen's own kernels are
// (memory-bound: wider vectors matter).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SAVAE_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SAVAE_CPU_CLONES
#endif

template <typename T>
void accumulate_kernel(T* __restrict__ total, const T* __restrict__ value, int64_t n) {
  for (int64_t j = 0; j < n; ++j) total[j] += value[j];
}

SAVAE_CPU_CLONES void accumulate_kernel(float* __restrict__ total, const float* __restrict__ value, int64_t n) {
  for (int64_t j = 0; j < n; ++j) total[j] += value[j];
}

SAVAE_CPU_CLONES void accumulate_kernel(double* __restrict__ total, const double* __restrict__ value, int64_t n) {
  for (int64_t j = 0; j < n; ++j) total[j] += value[j];
}

void accumulate_cpu(at::TensorList total, const c10::List<std::optional<at::Tensor>>& values) {
  check_accumulate_lists(total, values);
  // All tensors in one parallel region (fixed-size chunks of every tensor): one
  // call per refinement step instead of one dispatch per parameter tensor.
  struct Chunk {
    size_t tensor;
    int64_t begin, end;
  };
  constexpr int64_t kChunk = 1 << 13;
  std::vector<at::Tensor> vals(total.size());
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < total.size(); ++i) {
    const std::optional<at::Tensor> v = values.get(i);
    if (!v.has_value() || !v->defined()) continue;
    vals[i] = v->contiguous();
    for (int64_t b = 0; b < total[i].numel(); b += kChunk)
      chunks.push_back({i, b, std::min<int64_t>(b + kChunk, total[i].numel())});
  }
  at::parallel_for(0, int64_t(chunks.size()), 2, [&](int64_t c0, int64_t c1) {
    for (int64_t k = c0; k < c1; ++k) {
      const Chunk& ch = chunks[k];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, total[ch.tensor].scalar_type(),
                                      "savae_fast::accumulate_", [&] {
        accumulate_kernel(total[ch.tensor].data_ptr<scalar_t>() + ch.begin,
                          vals[ch.tensor].data_ptr<scalar_t>() + ch.begin, ch.end - ch.begin);
      });
    }
  });
}

}  // namespace

namespace cpu {
bool vector_kernels_enabled() { return vector_flag().load(); }
bool vector_kernels_compiled() { return cpu_has_avx2() && avx2_table_float() != nullptr; }
void set_vector_kernels(bool enabled) {
  TORCH_CHECK(!enabled || vector_kernels_compiled(),
              "savae_fast: the vectorised CPU kernels need AVX2+FMA (and a GCC x86-64 build)");
  vector_flag().store(enabled);
}
}  // namespace cpu

TORCH_LIBRARY_IMPL(savae_fast, CPU, m) {
  m.impl("sample", &sample_cpu);
  m.impl("forward_step", &forward_step_cpu);
  m.impl("reverse_direction", &reverse_direction_cpu);
  m.impl("reverse_update", &reverse_update_cpu);
  m.impl("accumulate_", &accumulate_cpu);
}

}  // namespace savae_fast
