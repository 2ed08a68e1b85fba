// Per-element math of the SA-VAE inner refinement loop.
//
// Torch-free and allocation-free: every function works on scalars so that the
// CPU kernels (csrc/cpu), the CUDA kernels (csrc/cuda) and the host test
// (csrc/tests) share exactly one implementation of each formula.
//
// Notation (docs/math.md defines every symbol): per example b and latent coordinate d,
//   lambda = (mu, logvar), sigma = exp(logvar / 2), z = mu + sigma * eps,
//   g_z = dNLL_b/dz (per-example decoder gradient, without the factor s),
//   inner objective L = s * sum_b [NLL_b(z_b) + beta * KL_b].
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SAVAE_HD __host__ __device__ __forceinline__
#else
#define SAVAE_HD inline
#endif

namespace savae_fast {
namespace math {

// Matches torch.nn.utils.clip_grad_norm_ and the authors' inner clipping.
constexpr double kClipEps = 1e-6;

// Which decoder evaluation the reverse step prepares.
enum FdMode : int {
  kExact = 0,    // evaluate at z itself (double backward supplies Hzz u)
  kForward = 1,  // one point, z + r u, fixed scalar r
  kCentral = 2,  // two points, z +- r_b u_b, per-example r_b
};

// Number of decoder evaluation points reverse_direction prepares.
constexpr int num_eval_points(FdMode mode) { return mode == kCentral ? 2 : 1; }

// exp and expm1 of one element. A struct (not free functions) so that a
// vector type can specialise it: the CPU kernels instantiate the formulas
// below on the AVX2 vectors of csrc/cpu/vec_avx2.h as well as on T.
template <typename T>
struct Elementwise {
  static SAVAE_HD T exp(T x) {
    using std::exp;
    return exp(x);
  }
  static SAVAE_HD T expm1(T x) {
    using std::expm1;
    return expm1(x);
  }
};

// sigma = exp(lv / 2) and exp(lv) - 1, both accurate over the whole range:
// with em = expm1(lv / 2), exp(lv) - 1 = em (sigma + 1) has no cancellation near
// lv = 0 (unlike sigma^2 - 1), and sigma from exp keeps full relative precision
// for very negative lv (unlike 1 + em). No clamping: lv = +-30 stays finite in float32.
template <typename T>
struct GaussTerms {
  T sigma;     // exp(lv / 2)
  T expm1_lv;  // exp(lv) - 1
};

template <typename T>
SAVAE_HD GaussTerms<T> gauss_terms(T logvar) {
  const T half = T(0.5) * logvar;
  const T sigma = Elementwise<T>::exp(half);
  return {sigma, Elementwise<T>::expm1(half) * (sigma + T(1))};
}

template <typename T>
SAVAE_HD T sigma_of(T logvar) {
  return Elementwise<T>::exp(T(0.5) * logvar);
}

// Reparameterised sample z = mu + sigma * eps.
template <typename T>
SAVAE_HD T sample(T mu, T sigma, T eps) {
  return mu + sigma * eps;
}

// Gradient of the inner objective w.r.t. (mu, logvar) at one element:
//   g_mu = s (g_z + beta mu)
//   g_lv = s (g_z eps sigma / 2 + beta (exp(lv) - 1) / 2)
template <typename T>
SAVAE_HD void elbo_grad(T g_z, T mu, GaussTerms<T> q, T eps, T scale, T kl_weight, T* g_mu, T* g_logvar) {
  *g_mu = scale * (g_z + kl_weight * mu);
  *g_logvar = scale * (T(0.5) * g_z * eps * q.sigma + T(0.5) * kl_weight * q.expm1_lv);
}

// Clip factor c = min(1, M / (|g| + 1e-6)); M <= 0 disables clipping.
template <typename T>
SAVAE_HD T clip_coef(T norm, T max_norm) {
  if (!(max_norm > T(0))) return T(1);
  const T c = max_norm / (norm + T(kClipEps));
  return c < T(1) ? c : T(1);
}

// The clip Jacobian is J v = c v - kappa g with
//   kappa = M (g . v) / (|g| (|g| + 1e-6)^2)   where clipping is active, 0 elsewhere.
// (d/dg [c(|g|) g] = c I + g (dc/dg)^T, dc/dg = -M g / (|g| (|g| + 1e-6)^2).)
// Evaluated as (M / (|g| + 1e-6)) ((g . v) / |g|) / (|g| + 1e-6): the cube of |g| overflows
// float32 once |g| passes about 7e12 (a large logvar with reduction "sum"), its factors do
// not. g = 0 (clipped only when M < 1e-6) has J v = c v.
template <typename T>
SAVAE_HD T clip_jacobian_kappa(T norm, T max_norm, T dot) {
  if (clip_coef(norm, max_norm) >= T(1) || !(norm > T(0))) return T(0);
  const T np = norm + T(kClipEps);
  return (max_norm / np) * (dot / norm) / np;
}

// Heavy-ball step of the authors' optimiser for one coordinate:
//   p' = m p - c g,  lambda' = lambda + lr p'.
template <typename T>
SAVAE_HD void momentum_step(T lambda, T p, T g, T clip, T lr, T momentum,
                            T* lambda_next, T* p_next) {
  const T pn = momentum * p - clip * g;
  *p_next = pn;
  *lambda_next = lambda + lr * pn;
}

// Direction in z-space of a lambda-space direction v = (v_mu, v_lv):
//   u = dz/dlambda v = v_mu + (sigma eps / 2) v_lv.
template <typename T>
SAVAE_HD T z_direction(T v_mu, T v_logvar, T sigma, T eps) {
  return v_mu + T(0.5) * sigma * eps * v_logvar;
}

// Per-example central-difference step r_b = h (1 + |z_b|) / |u_b| and the
// weight 1 / (2 r_b) of example b's loss; zero weight where u_b = 0 (its
// Hessian-vector product is exactly zero, the evaluation points coincide).
template <typename T>
SAVAE_HD void central_step(T z_norm, T u_norm, T fd_eps, T* step, T* weight) {
  if (u_norm > T(0)) {
    const T r = fd_eps * (T(1) + z_norm) / u_norm;
    *step = r;
    *weight = T(0.5) / r;
  } else {
    *step = T(0);
    *weight = T(0);
  }
}

// Hessian-vector product of the inner objective from Hzz u (exact Gaussian
// second-order terms; only Hzz u needs the decoder):
//   (H v)_mu = s (Hzz u + beta v_mu)
//   (H v)_lv = s ((sigma eps / 2) Hzz u + (sigma eps / 4) g_z v_lv + beta exp(lv) / 2 v_lv)
template <typename T>
SAVAE_HD void gaussian_hvp(T hzz_u, T v_mu, T v_logvar, T g_z, GaussTerms<T> q, T eps, T scale, T kl_weight,
                           T* hv_mu, T* hv_logvar) {
  const T sigma_eps = q.sigma * eps;
  *hv_mu = scale * (hzz_u + kl_weight * v_mu);
  *hv_logvar = scale * (T(0.5) * sigma_eps * hzz_u + T(0.25) * sigma_eps * g_z * v_logvar +
                        T(0.5) * kl_weight * (q.expm1_lv + T(1)) * v_logvar);
}

// Difference quotient: (a - b) * inv_step (b = 0 for the exact mode).
template <typename T>
SAVAE_HD T difference_quotient(T a, T b, T inv_step) {
  return (a - b) * inv_step;
}

}  // namespace math
}  // namespace savae_fast
