// Loops of the CPU kernels, written once over a "vector" type V: the element
// type T itself (portable build, csrc/cpu/refine_cpu.cpp) or cpu::Vec<T> of vec_avx2.h
// (AVX2 build, csrc/cpu/kernels_avx2.cpp). The per-element formulas are those of
// savae_math.h instantiated on V. Every function works on raw pointers over a
// range of elements or rows; threading, argument checks and all per-tensor /
// per-row scalar work (clip factors, central-difference steps) stay in
// refine_cpu.cpp, so the AVX2 build instantiates nothing on plain T.
#pragma once

#include <cstdint>

#include "../savae_math.h"

#if defined(__GNUC__)
#define SAVAE_FAST_FLATTEN __attribute__((flatten))
#else
#define SAVAE_FAST_FLATTEN
#endif

namespace savae_fast {
namespace cpu {

// Loads, stores and horizontal sums of V (specialised for the vector type in the AVX2 build).
template <typename V>
struct VecOps {
  using T = V;
  static constexpr int size = 1;
  static V load(const T* p, int) { return *p; }
  static void store(T* p, V v, int) { *p = v; }
  static double hsum(V v) { return double(v); }
};

// Function pointers of one build (portable or AVX2) for element type T.
template <typename T>
struct KernelTable {
  void (*sample)(const T* mu, const T* lv, const T* eps, T* z, int64_t i0, int64_t i1);
  // rows [b0, b1) of width d: g_mu, g_lv into g_mu_out / g_lv_out, squared norms per row into partial[2 b..]
  void (*grad_sq_rows)(const T* gz, const T* mu, const T* lv, const T* eps, T scale, T kl_weight, T* g_mu_out,
                       T* g_lv_out, double* partial, int64_t b0, int64_t b1, int64_t d);
  // [i0, i1): momentum step from the stored g, next sample (en may be null)
  void (*forward_update)(const T* mu, const T* lv, const T* p_mu, const T* p_lv, const T* en, T c_mu, T c_lv,
                         T lr_mu, T lr_lv, T momentum, T* mu_out, T* lv_out, T* pm_inout, T* pl_inout, T* z_out,
                         int64_t i0, int64_t i1);
  // rows (where clipping is active): pbar' = pbar + lr lbar, and g . pbar' per row into partial[2 b..]
  void (*reverse_dots_rows)(const T* lbm, const T* lbl, const T* pbm, const T* pbl, const T* gz, const T* mu,
                            const T* lv, const T* eps, T scale, T kl_weight, T lr_mu, T lr_lv, T* pbm_out,
                            T* pbl_out, double* partial, int64_t b0, int64_t b1, int64_t d);
  // rows: pbar' = pbar + lr lbar into pbm_out / pbl_out (unless clipped: reverse_dots_rows
  // already stored it there), v = J pbar', u, z (+ step u for the forward difference) into
  // z_out; |u_b|^2, |z_b|^2 per row
  void (*reverse_rows)(const T* lbm, const T* lbl, const T* pbm, const T* pbl, T lr_mu, T lr_lv,
                       T* pbm_out, T* pbl_out, const T* gz, const T* mu, const T* lv, const T* eps, T scale,
                       T kl_weight, T c_mu, T c_lv, T k_mu, T k_lv, bool clipped, T z_step, T* v_mu, T* v_lv, T* u,
                       T* z_out, double* uu, double* zz, int64_t b0, int64_t b1, int64_t d);
  // rows: z_plus = z + r_b u, z_minus = z - r_b u (z_plus holds z on entry)
  void (*central_points)(const T* u, const T* r, T* z_plus, T* z_minus, int64_t b0, int64_t b1, int64_t d);
  void (*reverse_update)(const T* lbm, const T* lbl, const T* pbm, const T* pbl, const T* vm, const T* vl,
                         const T* lv, const T* eps, const T* gz, const T* a, const T* b, T hvp_scale, T scale,
                         T kl_weight, T momentum, T* lbm_out, T* lbl_out, T* pbm_out, T* pbl_out, int64_t i0,
                         int64_t i1);
};

template <typename T, typename V>
struct Loops {
  using O = VecOps<V>;
  static constexpr int W = O::size;

  // Calls f(i, n) over [i0, i1) in chunks of W elements (the last chunk may be shorter).
  // Flattened: a body past GCC's inlining limit would otherwise be called out of line per
  // chunk, with its vectors passed through memory (2-3x slower loops).
  template <typename F>
  SAVAE_FAST_FLATTEN static inline void chunks(int64_t i0, int64_t i1, F f) {
    int64_t i = i0;
    for (; i + W <= i1; i += W) f(i, W);
    if (i < i1) f(i, int(i1 - i));
  }

  static void sample(const T* mu, const T* lv, const T* eps, T* z, int64_t i0, int64_t i1) {
    chunks(i0, i1, [&](int64_t i, int n) {
      O::store(z + i, math::sample(O::load(mu + i, n), math::sigma_of(O::load(lv + i, n)), O::load(eps + i, n)), n);
    });
  }

  static void grad_sq_rows(const T* gz, const T* mu, const T* lv, const T* eps, T scale, T kl_weight, T* g_mu_out,
                           T* g_lv_out, double* partial, int64_t b0, int64_t b1, int64_t d) {
    const V s(scale), beta(kl_weight);
    for (int64_t b = b0; b < b1; ++b) {
      V sm(T(0)), sl(T(0));
      chunks(b * d, (b + 1) * d, [&](int64_t i, int n) {
        V gm, gl;
        math::elbo_grad(O::load(gz + i, n), O::load(mu + i, n), math::gauss_terms(O::load(lv + i, n)),
                        O::load(eps + i, n), s, beta, &gm, &gl);
        O::store(g_mu_out + i, gm, n);
        O::store(g_lv_out + i, gl, n);
        sm = sm + gm * gm;  // lanes past n are zero: loads fill them with zeros, and g(0) = 0
        sl = sl + gl * gl;
      });
      partial[2 * b] = O::hsum(sm);
      partial[2 * b + 1] = O::hsum(sl);
    }
  }

  static void forward_update(const T* mu, const T* lv, const T* p_mu, const T* p_lv, const T* en, T c_mu, T c_lv,
                             T lr_mu, T lr_lv, T momentum, T* mu_out, T* lv_out, T* pm_inout, T* pl_inout, T* z_out,
                             int64_t i0, int64_t i1) {
    const V cm(c_mu), cl(c_lv), am(lr_mu), al(lr_lv), mom(momentum);
    chunks(i0, i1, [&](int64_t i, int n) {
      V mn, ln, pm, pl;
      math::momentum_step(O::load(mu + i, n), O::load(p_mu + i, n), O::load(pm_inout + i, n), cm, am, mom, &mn, &pm);
      math::momentum_step(O::load(lv + i, n), O::load(p_lv + i, n), O::load(pl_inout + i, n), cl, al, mom, &ln, &pl);
      O::store(mu_out + i, mn, n);
      O::store(lv_out + i, ln, n);
      O::store(pm_inout + i, pm, n);
      O::store(pl_inout + i, pl, n);
      if (z_out) O::store(z_out + i, math::sample(mn, math::sigma_of(ln), O::load(en + i, n)), n);
    });
  }

  static void reverse_dots_rows(const T* lbm, const T* lbl, const T* pbm, const T* pbl, const T* gz, const T* mu,
                                const T* lv, const T* eps, T scale, T kl_weight, T lr_mu, T lr_lv, T* pbm_out,
                                T* pbl_out, double* partial, int64_t b0, int64_t b1, int64_t d) {
    const V s(scale), beta(kl_weight), am(lr_mu), al(lr_lv);
    for (int64_t b = b0; b < b1; ++b) {
      V dm(T(0)), dl(T(0));
      chunks(b * d, (b + 1) * d, [&](int64_t i, int n) {
        const V pm = O::load(pbm + i, n) + am * O::load(lbm + i, n);
        const V pl = O::load(pbl + i, n) + al * O::load(lbl + i, n);
        O::store(pbm_out + i, pm, n);
        O::store(pbl_out + i, pl, n);
        V gm, gl;
        math::elbo_grad(O::load(gz + i, n), O::load(mu + i, n), math::gauss_terms(O::load(lv + i, n)),
                        O::load(eps + i, n), s, beta, &gm, &gl);
        dm = dm + gm * pm;
        dl = dl + gl * pl;
      });
      partial[2 * b] = O::hsum(dm);
      partial[2 * b + 1] = O::hsum(dl);
    }
  }

  static void reverse_rows(const T* lbm, const T* lbl, const T* pbm, const T* pbl, T lr_mu, T lr_lv,
                           T* pbm_out, T* pbl_out, const T* gz, const T* mu, const T* lv, const T* eps, T scale,
                           T kl_weight, T c_mu, T c_lv, T k_mu, T k_lv, bool clipped, T z_step, T* v_mu, T* v_lv,
                           T* u, T* z_out, double* uu, double* zz, int64_t b0, int64_t b1, int64_t d) {
    const V s(scale), beta(kl_weight), cm(c_mu), cl(c_lv), km(k_mu), kl(k_lv), h(z_step), am(lr_mu), al(lr_lv);
    for (int64_t b = b0; b < b1; ++b) {
      V su(T(0)), sz(T(0));
      chunks(b * d, (b + 1) * d, [&](int64_t i, int n) {
        const V lvi = O::load(lv + i, n), mui = O::load(mu + i, n), ei = O::load(eps + i, n);
        const math::GaussTerms<V> q = math::gauss_terms(lvi);
        V pm, pl;
        if (clipped) {  // reverse_dots_rows stored pbar'
          pm = O::load(pbm_out + i, n);
          pl = O::load(pbl_out + i, n);
        } else {
          pm = O::load(pbm + i, n) + am * O::load(lbm + i, n);
          pl = O::load(pbl + i, n) + al * O::load(lbl + i, n);
          O::store(pbm_out + i, pm, n);
          O::store(pbl_out + i, pl, n);
        }
        V vm = cm * pm, vl = cl * pl;
        if (clipped) {
          V gm, gl;
          math::elbo_grad(O::load(gz + i, n), mui, q, ei, s, beta, &gm, &gl);
          vm = vm - km * gm;
          vl = vl - kl * gl;
        }
        const V ui = math::z_direction(vm, vl, q.sigma, ei);
        const V zi = math::sample(mui, q.sigma, ei);
        O::store(v_mu + i, vm, n);
        O::store(v_lv + i, vl, n);
        O::store(u + i, ui, n);
        O::store(z_out + i, zi + h * ui, n);
        su = su + ui * ui;
        sz = sz + zi * zi;
      });
      uu[b] = O::hsum(su);
      zz[b] = O::hsum(sz);
    }
  }

  static void central_points(const T* u, const T* r, T* z_plus, T* z_minus, int64_t b0, int64_t b1, int64_t d) {
    for (int64_t b = b0; b < b1; ++b) {
      const V rb(r[b]);
      chunks(b * d, (b + 1) * d, [&](int64_t i, int n) {
        const V zi = O::load(z_plus + i, n), du = rb * O::load(u + i, n);
        O::store(z_plus + i, zi + du, n);
        O::store(z_minus + i, zi - du, n);
      });
    }
  }

  static void reverse_update(const T* lbm, const T* lbl, const T* pbm, const T* pbl, const T* vm, const T* vl,
                             const T* lv, const T* eps, const T* gz, const T* a, const T* b, T hvp_scale, T scale,
                             T kl_weight, T momentum, T* lbm_out, T* lbl_out, T* pbm_out, T* pbl_out, int64_t i0,
                             int64_t i1) {
    const V q(hvp_scale), s(scale), beta(kl_weight), mom(momentum), zero(T(0));
    chunks(i0, i1, [&](int64_t i, int n) {
      const V hzz = math::difference_quotient(O::load(a + i, n), b ? O::load(b + i, n) : zero, q);
      V hm, hl;
      math::gaussian_hvp(hzz, O::load(vm + i, n), O::load(vl + i, n), O::load(gz + i, n),
                         math::gauss_terms(O::load(lv + i, n)), O::load(eps + i, n), s, beta, &hm, &hl);
      O::store(lbm_out + i, O::load(lbm + i, n) - hm, n);
      O::store(lbl_out + i, O::load(lbl + i, n) - hl, n);
      O::store(pbm_out + i, mom * O::load(pbm + i, n), n);
      O::store(pbl_out + i, mom * O::load(pbl + i, n), n);
    });
  }

  static KernelTable<T> table() {
    return {&sample, &grad_sq_rows, &forward_update, &reverse_dots_rows, &reverse_rows, &central_points,
            &reverse_update};
  }
};

// The AVX2 build's tables (kernels_avx2.cpp); null where it was not compiled.
const KernelTable<float>* avx2_table_float();
const KernelTable<double>* avx2_table_double();

// Whether the vectorised kernels are used (CPU support, SAVAE_FAST_CPU_VECTOR != 0; tests switch it).
bool vector_kernels_enabled();
void set_vector_kernels(bool enabled);
bool vector_kernels_compiled();

}  // namespace cpu
}  // namespace savae_fast
