// Host test of csrc/savae_math.h (no torch): every closed-form derivative is
// checked against central differences of the function it differentiates, on a
// synthetic decoder NLL f(z) = sin(z) + 0.3 z^2 applied per element.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "savae_math.h"

namespace m = savae_fast::math;

static int failures = 0;

static void check_close(const char* what, double got, double want, double tol) {
  const double err = std::fabs(got - want) / std::max(1.0, std::fabs(want));
  if (!(err <= tol)) {
    std::printf("FAIL %-40s got % .15e want % .15e (err %.2e > %.1e)\n", what, got, want, err, tol);
    ++failures;
  }
}

static double f(double z) { return std::sin(z) + 0.3 * z * z; }
static double df(double z) { return std::cos(z) + 0.6 * z; }
static double d2f(double z) { return -std::sin(z) + 0.6; }

// Inner objective of one element: s [f(mu + exp(lv/2) eps) + beta KL(mu, lv)].
static double inner_loss(double mu, double lv, double eps, double s, double beta) {
  const double kl = -0.5 * (1.0 + lv - mu * mu - std::exp(lv));
  return s * (f(m::sample(mu, m::sigma_of(lv), eps)) + beta * kl);
}

static void elbo_grad_at(double mu, double lv, double eps, double s, double beta, double* gm, double* gl) {
  m::elbo_grad(df(m::sample(mu, m::sigma_of(lv), eps)), mu, m::gauss_terms(lv), eps, s, beta, gm, gl);
}

static void test_elbo_grad_and_hvp(std::mt19937& rng) {
  std::normal_distribution<double> n01;
  const double h = 1e-6;
  for (int trial = 0; trial < 200; ++trial) {
    const double mu = n01(rng), lv = 0.5 * n01(rng), eps = n01(rng);
    const double s = trial % 2 ? 0.125 : 1.0, beta = 0.1 + 0.2 * (trial % 5);
    double gm, gl;
    elbo_grad_at(mu, lv, eps, s, beta, &gm, &gl);
    check_close("elbo_grad: g_mu", gm,
                (inner_loss(mu + h, lv, eps, s, beta) - inner_loss(mu - h, lv, eps, s, beta)) / (2 * h), 1e-8);
    check_close("elbo_grad: g_logvar", gl,
                (inner_loss(mu, lv + h, eps, s, beta) - inner_loss(mu, lv - h, eps, s, beta)) / (2 * h), 1e-8);

    // H v from the exact Hzz u (u = dz/dlambda v), against differences of the gradient.
    const double v_mu = n01(rng), v_lv = n01(rng);
    const double u = m::z_direction(v_mu, v_lv, m::sigma_of(lv), eps);
    const double z = m::sample(mu, m::sigma_of(lv), eps);
    double hm, hl;
    m::gaussian_hvp(d2f(z) * u, v_mu, v_lv, df(z), m::gauss_terms(lv), eps, s, beta, &hm, &hl);
    double gmp, glp, gmm, glm;
    elbo_grad_at(mu + h * v_mu, lv + h * v_lv, eps, s, beta, &gmp, &glp);
    elbo_grad_at(mu - h * v_mu, lv - h * v_lv, eps, s, beta, &gmm, &glm);
    check_close("gaussian_hvp: (Hv)_mu", hm, (gmp - gmm) / (2 * h), 1e-7);
    check_close("gaussian_hvp: (Hv)_logvar", hl, (glp - glm) / (2 * h), 1e-7);
  }
}

// clip(g) = c(|g|) g over a whole vector; its Jacobian applied to v is c v - kappa g.
static void test_clip_jacobian(std::mt19937& rng) {
  std::normal_distribution<double> n01;
  const int n = 7;
  for (int trial = 0; trial < 100; ++trial) {
    std::vector<double> g(n), v(n);
    double norm2 = 0, dot = 0;
    for (int i = 0; i < n; ++i) {
      g[i] = n01(rng);
      v[i] = n01(rng);
      norm2 += g[i] * g[i];
      dot += g[i] * v[i];
    }
    const double norm = std::sqrt(norm2);
    const double max_norm = trial % 2 ? 0.4 * norm : 3.0 * norm;  // active / inactive
    const double c = m::clip_coef(norm, max_norm);
    const double kappa = m::clip_jacobian_kappa(norm, max_norm, dot);
    check_close("clip_coef in (0, 1]", c > 0 && c <= 1, 1.0, 0);
    if (trial % 2 == 0) check_close("clip inactive: kappa = 0", kappa, 0.0, 0);
    auto clipped = [&](double t, int i) {
      double nn = 0;
      for (int j = 0; j < n; ++j) nn += (g[j] + t * v[j]) * (g[j] + t * v[j]);
      return m::clip_coef(std::sqrt(nn), max_norm) * (g[i] + t * v[i]);
    };
    const double h = 1e-6;
    for (int i = 0; i < n; ++i)
      check_close("clip Jacobian J v", c * v[i] - kappa * g[i], (clipped(h, i) - clipped(-h, i)) / (2 * h), 1e-7);
  }
  check_close("clip disabled (max_norm <= 0)", m::clip_coef(10.0, 0.0), 1.0, 0);
  // float32 at gradient norms whose cube overflows (logvar near 30, reduction "sum"): kappa
  // stays finite and keeps float32 accuracy, for large and small dot products.
  for (const double norm : {7e12, 2.3e13, 1e16}) {  // (above ~1e17 kappa itself nears float32 underflow)
    for (const double dot_over_norm : {1e-3, 0.7, 4e2}) {
      const double dot = dot_over_norm * norm, max_norm = 5.0;
      const float kf = m::clip_jacobian_kappa(float(norm), float(max_norm), float(dot));
      const double kd = m::clip_jacobian_kappa(norm, max_norm, dot);
      check_close("float32 kappa at a large norm (relative)", std::fabs(double(kf) / kd - 1.0) <= 1e-6, 1.0, 0);
    }
  }
  check_close("kappa of a zero gradient clipped by a tiny max_norm", m::clip_jacobian_kappa(0.0, 1e-9, 0.0), 0.0, 0);
}

static void test_step_and_differences() {
  double lam, p;
  m::momentum_step(1.0, 0.5, 2.0, 0.25, 0.1, 0.9, &lam, &p);
  check_close("momentum_step p'", p, 0.9 * 0.5 - 0.25 * 2.0, 1e-15);
  check_close("momentum_step lambda'", lam, 1.0 + 0.1 * p, 1e-15);

  double r, w;
  m::central_step(3.0, 2.0, 1e-3, &r, &w);
  check_close("central_step r", r, 1e-3 * 4.0 / 2.0, 1e-15);
  check_close("central_step weight", w, 0.5 / r, 1e-15);
  m::central_step(3.0, 0.0, 1e-3, &r, &w);
  check_close("central_step zero direction weight", w, 0.0, 0);

  // The central quotient with per-example weights recovers f''(z) u to O(h^2).
  const double z = 0.7, u = -1.3;
  m::central_step(std::fabs(z), std::fabs(u), 1e-5, &r, &w);
  check_close("central quotient", m::difference_quotient(w * df(z + r * u), w * df(z - r * u), 1.0), d2f(z) * u,
              1e-8);
  check_close("float template instantiation", m::sample(1.0f, m::sigma_of(0.0f), 2.0f), 3.0, 1e-7);
  for (const double lv : {-60.0, -30.0, -1e-9, 0.0, 3e-8, 0.7, 12.0, 30.0}) {
    const m::GaussTerms<double> q = m::gauss_terms(lv);
    const double rel_sigma = std::fabs(q.sigma / std::exp(0.5 * lv) - 1.0);
    const double rel_em = lv == 0.0 ? std::fabs(q.expm1_lv) : std::fabs(q.expm1_lv / std::expm1(lv) - 1.0);
    check_close("gauss_terms sigma (relative)", rel_sigma <= 1e-15, 1.0, 0);
    check_close("gauss_terms expm1 (relative)", rel_em <= 1e-15, 1.0, 0);
    const m::GaussTerms<float> qf = m::gauss_terms(float(lv));  // float32: relative accuracy kept
    check_close("gauss_terms float sigma", std::fabs(double(qf.sigma) / std::exp(0.5 * lv) - 1.0) <= 1e-6, 1.0, 0);
  }
}

int main() {
  std::mt19937 rng(12345);
  test_elbo_grad_and_hvp(rng);
  test_clip_jacobian(rng);
  test_step_and_differences();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("savae_math: all checks passed\n");
  return 0;
}
