// CPU kernels of the savae_fast:: operators.
//
// Rows (examples) are split across threads with at::parallel_for; the inner
// loop over the latent dimension is a plain contiguous loop the compiler can
// vectorise. Whole-tensor reductions (clip norms, clip-Jacobian dot products)
// are accumulated per row in double and summed serially, so results do not
// depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../op_common.h"
#include "../savae_math.h"

namespace savae_fast {
namespace {

using math::FdMode;

// Rows per task: keep tiny problems on one thread (spawning costs more than the work).
inline int64_t row_grain(int64_t cols) {
  constexpr int64_t kElementsPerTask = 1 << 14;
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, cols));
}

// ---------------------------------------------------------------- sample
at::Tensor sample_cpu(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps) {
  auto m = check_matrices("sample", {{"mu", &mu}, {"logvar", &logvar}, {"eps", &eps}});
  at::Tensor z = at::empty_like(m[0]);
  const int64_t n = m[0].numel();
  AT_DISPATCH_FLOATING_TYPES(m.dtype(), "savae_fast::sample", [&] {
    const scalar_t* __restrict__ pm = m[0].data_ptr<scalar_t>();
    const scalar_t* __restrict__ pl = m[1].data_ptr<scalar_t>();
    const scalar_t* __restrict__ pe = m[2].data_ptr<scalar_t>();
    scalar_t* __restrict__ pz = z.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) pz[i] = math::sample(pm[i], math::sigma_of(pl[i]), pe[i]);
    });
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
    const T* __restrict__ x_mu = m[0].data_ptr<T>();
    const T* __restrict__ x_lv = m[1].data_ptr<T>();
    const T* __restrict__ x_pm = m[2].data_ptr<T>();
    const T* __restrict__ x_pl = m[3].data_ptr<T>();
    const T* __restrict__ x_e = m[4].data_ptr<T>();
    const T* __restrict__ x_gz = m[5].data_ptr<T>();
    const T* __restrict__ x_en = has_next ? en.data_ptr<T>() : nullptr;
    const T s = T(scale), beta = T(kl_weight);

    T* __restrict__ o_mu = mu_n.data_ptr<T>();
    T* __restrict__ o_lv = lv_n.data_ptr<T>();
    T* __restrict__ o_pm = pm_n.data_ptr<T>();
    T* __restrict__ o_pl = pl_n.data_ptr<T>();
    T* __restrict__ o_z = has_next ? z_n.data_ptr<T>() : nullptr;

    // Pass 1: g_mu, g_logvar (kept in the momentum outputs until pass 2) and
    // their squared norms, per row, then summed in order.
    std::vector<double> part(2 * B);
    at::parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double sm = 0, sl = 0;
        for (int64_t i = b * D; i < (b + 1) * D; ++i) {
          T gm, gl;
          math::elbo_grad(x_gz[i], x_mu[i], math::gauss_terms(x_lv[i]), x_e[i], s, beta, &gm, &gl);
          o_pm[i] = gm;
          o_pl[i] = gl;
          sm += double(gm) * double(gm);
          sl += double(gl) * double(gl);
        }
        part[2 * b] = sm;
        part[2 * b + 1] = sl;
      }
    });
    double sm = 0, sl = 0;
    for (int64_t b = 0; b < B; ++b) {
      sm += part[2 * b];
      sl += part[2 * b + 1];
    }
    const T n_mu = T(std::sqrt(sm)), n_lv = T(std::sqrt(sl));
    norms.data_ptr<T>()[0] = n_mu;
    norms.data_ptr<T>()[1] = n_lv;
    const T c_mu = math::clip_coef(n_mu, T(max_grad_norm));
    const T c_lv = math::clip_coef(n_lv, T(max_grad_norm));

    // Pass 2: clipped momentum step and the next sample.
    const T a_mu = T(lr_mu), a_lv = T(lr_logvar), mom = T(momentum);
    at::parallel_for(0, B * D, 1 << 14, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        math::momentum_step(x_mu[i], x_pm[i], o_pm[i], c_mu, a_mu, mom, &o_mu[i], &o_pm[i]);
        math::momentum_step(x_lv[i], x_pl[i], o_pl[i], c_lv, a_lv, mom, &o_lv[i], &o_pl[i]);
        if (o_z) o_z[i] = math::sample(o_mu[i], math::sigma_of(o_lv[i]), x_en[i]);
      }
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
    const T* __restrict__ x_lbm = m[0].data_ptr<T>();
    const T* __restrict__ x_lbl = m[1].data_ptr<T>();
    const T* __restrict__ x_pbm = m[2].data_ptr<T>();
    const T* __restrict__ x_pbl = m[3].data_ptr<T>();
    const T* __restrict__ x_mu = m[4].data_ptr<T>();
    const T* __restrict__ x_lv = m[5].data_ptr<T>();
    const T* __restrict__ x_e = m[6].data_ptr<T>();
    const T* __restrict__ x_gz = m[7].data_ptr<T>();
    T* __restrict__ o_pbm = pbm_n.data_ptr<T>();
    T* __restrict__ o_pbl = pbl_n.data_ptr<T>();
    T* __restrict__ o_vm = v_mu.data_ptr<T>();
    T* __restrict__ o_vl = v_lv.data_ptr<T>();
    T* __restrict__ o_u = u.data_ptr<T>();
    T* __restrict__ o_z = z_eval.data_ptr<T>();
    T* __restrict__ o_w = row_weight.data_ptr<T>();
    const T s = T(scale), beta = T(kl_weight), M = T(max_grad_norm);
    const T a_mu = T(lr_mu), a_lv = T(lr_logvar);
    const T n_mu = norms.data_ptr<T>()[0], n_lv = norms.data_ptr<T>()[1];
    const T c_mu = math::clip_coef(n_mu, M), c_lv = math::clip_coef(n_lv, M);
    const bool clip_mu = c_mu < T(1), clip_lv = c_lv < T(1);

    // Pass 1: pbar += lr * lbar, and (only where clipping was active) the dot
    // products g . pbar the clip Jacobian needs.
    std::vector<double> part(2 * B, 0.0);
    at::parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double dm = 0, dl = 0;
        for (int64_t i = b * D; i < (b + 1) * D; ++i) {
          const T pm = x_pbm[i] + a_mu * x_lbm[i];
          const T pl = x_pbl[i] + a_lv * x_lbl[i];
          o_pbm[i] = pm;
          o_pbl[i] = pl;
          if (clip_mu || clip_lv) {
            T gm, gl;
            math::elbo_grad(x_gz[i], x_mu[i], math::gauss_terms(x_lv[i]), x_e[i], s, beta, &gm, &gl);
            dm += double(gm) * double(pm);
            dl += double(gl) * double(pl);
          }
        }
        part[2 * b] = dm;
        part[2 * b + 1] = dl;
      }
    });
    double dm = 0, dl = 0;
    for (int64_t b = 0; b < B; ++b) {
      dm += part[2 * b];
      dl += part[2 * b + 1];
    }
    const T k_mu = math::clip_jacobian_kappa(n_mu, M, T(dm));
    const T k_lv = math::clip_jacobian_kappa(n_lv, M, T(dl));

    // Pass 2 (row-wise): v = J pbar, u, and the evaluation points.
    const T h = T(fd_step);
    at::parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double uu = 0, zz = 0;
        for (int64_t i = b * D; i < (b + 1) * D; ++i) {
          const math::GaussTerms<T> q = math::gauss_terms(x_lv[i]);
          T vm = c_mu * o_pbm[i], vl = c_lv * o_pbl[i];
          if (clip_mu || clip_lv) {
            T gm, gl;
            math::elbo_grad(x_gz[i], x_mu[i], q, x_e[i], s, beta, &gm, &gl);
            vm -= k_mu * gm;
            vl -= k_lv * gl;
          }
          o_vm[i] = vm;
          o_vl[i] = vl;
          const T ui = math::z_direction(vm, vl, q.sigma, x_e[i]);
          const T zi = math::sample(x_mu[i], q.sigma, x_e[i]);
          o_u[i] = ui;
          o_z[i] = zi;
          uu += double(ui) * double(ui);
          zz += double(zi) * double(zi);
        }
        T r = h, w = T(1);
        if (fd_mode == FdMode::kCentral)
          math::central_step(T(std::sqrt(zz)), T(std::sqrt(uu)), h, &r, &w);
        o_w[b] = w;
        if (fd_mode == FdMode::kExact) continue;
        T* __restrict__ z_plus = o_z;
        T* __restrict__ z_minus = o_z + B * D;
        for (int64_t i = b * D; i < (b + 1) * D; ++i) {
          const T zi = z_plus[i], du = r * o_u[i];
          z_plus[i] = zi + du;
          if (fd_mode == FdMode::kCentral) z_minus[i] = zi - du;
        }
      }
    });
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
    const T* __restrict__ x_lbm = m[0].data_ptr<T>();
    const T* __restrict__ x_lbl = m[1].data_ptr<T>();
    const T* __restrict__ x_pbm = m[2].data_ptr<T>();
    const T* __restrict__ x_pbl = m[3].data_ptr<T>();
    const T* __restrict__ x_vm = m[4].data_ptr<T>();
    const T* __restrict__ x_vl = m[5].data_ptr<T>();
    const T* __restrict__ x_lv = m[6].data_ptr<T>();
    const T* __restrict__ x_e = m[7].data_ptr<T>();
    const T* __restrict__ x_gz = m[8].data_ptr<T>();
    const T* __restrict__ x_a = m[9].data_ptr<T>();
    const T* __restrict__ x_b = has_b ? hb.data_ptr<T>() : nullptr;
    T* __restrict__ o_lbm = lbm_n.data_ptr<T>();
    T* __restrict__ o_lbl = lbl_n.data_ptr<T>();
    T* __restrict__ o_pbm = pbm_n.data_ptr<T>();
    T* __restrict__ o_pbl = pbl_n.data_ptr<T>();
    const T q = T(hvp_scale), s = T(scale), beta = T(kl_weight), mom = T(momentum);
    at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T hzz = math::difference_quotient(x_a[i], x_b ? x_b[i] : T(0), q);
        T hm, hl;
        math::gaussian_hvp(hzz, x_vm[i], x_vl[i], x_gz[i], math::gauss_terms(x_lv[i]), x_e[i], s, beta, &hm, &hl);
        o_lbm[i] = x_lbm[i] - hm;
        o_lbl[i] = x_lbl[i] - hl;
        o_pbm[i] = mom * x_pbm[i];
        o_pbl[i] = mom * x_pbl[i];
      }
    });
  });
  return {lbm_n, lbl_n, pbm_n, pbl_n};
}

// ------------------------------------------------- compensated_accumulate_
// Plain functions with restrict-qualified parameters (not a lambda capture) so
// that the compiler vectorises the loop (the selects in compensated_add become
// blends); float/double are compiled for AVX2 and baseline x86-64 and picked at
// load time, as ATen's own kernels are (memory-bound: wider vectors matter).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SAVAE_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SAVAE_CPU_CLONES
#endif

template <typename T>
void compensated_accumulate_kernel(T* __restrict__ total, T* __restrict__ comp, const T* __restrict__ value,
                                   int64_t n) {
  for (int64_t j = 0; j < n; ++j) math::compensated_add(&total[j], &comp[j], value[j]);
}

SAVAE_CPU_CLONES void compensated_accumulate_kernel(float* __restrict__ total, float* __restrict__ comp,
                                                    const float* __restrict__ value, int64_t n) {
  for (int64_t j = 0; j < n; ++j) math::compensated_add(&total[j], &comp[j], value[j]);
}

SAVAE_CPU_CLONES void compensated_accumulate_kernel(double* __restrict__ total, double* __restrict__ comp,
                                                    const double* __restrict__ value, int64_t n) {
  for (int64_t j = 0; j < n; ++j) math::compensated_add(&total[j], &comp[j], value[j]);
}

void compensated_accumulate_cpu(at::TensorList total, at::TensorList comp,
                                const c10::List<std::optional<at::Tensor>>& values) {
  check_accumulate_lists(total, comp, values);
  // All tensors in one parallel region: fixed-size chunks of every tensor.
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
                                      "savae_fast::compensated_accumulate_", [&] {
        compensated_accumulate_kernel(total[ch.tensor].data_ptr<scalar_t>() + ch.begin,
                                      comp[ch.tensor].data_ptr<scalar_t>() + ch.begin,
                                      vals[ch.tensor].data_ptr<scalar_t>() + ch.begin, ch.end - ch.begin);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(savae_fast, CPU, m) {
  m.impl("sample", &sample_cpu);
  m.impl("forward_step", &forward_step_cpu);
  m.impl("reverse_direction", &reverse_direction_cpu);
  m.impl("reverse_update", &reverse_update_cpu);
  m.impl("compensated_accumulate_", &compensated_accumulate_cpu);
}

}  // namespace savae_fast
