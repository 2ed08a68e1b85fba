// CPU backend of the savae_fast:: operators (csrc/op_impl.h): threading and
// the scalar per-tensor / per-row work; the loops are those of kernels.h, in
// their AVX2 build (kernels_avx2.cpp) when the CPU supports it, else their
// portable build (instantiated here).
//
// Rows (examples) are split across threads with torch::stable::parallel_for;
// whole-tensor reductions (clip norms, clip-Jacobian dots) are summed per row
// and then over rows in order, so results do not depend on the number of threads.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "../op_impl.h"
#include "../savae_math.h"
#include "kernels.h"

namespace savae_fast {
namespace {

using math::FdMode;
using torch::stable::parallel_for;

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

// ----------------------------------------------------------- the backend
template <typename T>
void sample_rows(const SampleParams<T>& p) {
  const auto& k = kernels<T>();
  parallel_for(0, p.numel, 1 << 14, [&](int64_t i0, int64_t i1) { k.sample(p.mu, p.logvar, p.eps, p.z, i0, i1); });
}

template <typename T>
void forward_step_rows(const ForwardStepParams<T>& p) {
  const auto& k = kernels<T>();
  const int64_t B = p.rows, D = p.cols;
  const StepScalars<T>& s = p.s;
  // Pass 1: g_mu, g_logvar (kept in the momentum outputs until pass 2) and their
  // squared norms per row; pass 2: clipped momentum step and the next sample.
  std::vector<double> part(2 * B);
  parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
    k.grad_sq_rows(p.grad_z, p.mu, p.logvar, p.eps, s.scale, s.kl_weight, p.p_mu_out, p.p_logvar_out, part.data(),
                   b0, b1, D);
  });
  // A row whose squares overflowed T (float32 gradients above ~1e19 per element: logvar
  // above ~44) is summed again in double from the stored gradients, so that a norm T can
  // hold is not turned into inf (which would make the clip factor, and the step, zero).
  for (int64_t b = 0; b < B; ++b) {
    for (int col = 0; col < 2; ++col) {
      if (std::isfinite(part[2 * b + col])) continue;
      const T* g = (col == 0 ? p.p_mu_out : p.p_logvar_out) + b * D;
      double sq = 0;
      for (int64_t j = 0; j < D; ++j) sq += double(g[j]) * double(g[j]);
      part[2 * b + col] = sq;
    }
  }
  const auto [sm, sl] = ordered_sum(part, B);
  const T n_mu = T(std::sqrt(sm)), n_lv = T(std::sqrt(sl));
  p.grad_norms_out[0] = n_mu;
  p.grad_norms_out[1] = n_lv;
  const T c_mu = math::clip_coef(n_mu, s.max_grad_norm), c_lv = math::clip_coef(n_lv, s.max_grad_norm);
  parallel_for(0, B * D, 1 << 14, [&](int64_t i0, int64_t i1) {
    k.forward_update(p.mu, p.logvar, p.p_mu, p.p_logvar, p.eps_next, c_mu, c_lv, s.lr_mu, s.lr_logvar, s.momentum,
                     p.mu_out, p.logvar_out, p.p_mu_out, p.p_logvar_out, p.z_next_out, i0, i1);
  });
}

template <typename T>
void reverse_direction_rows(const ReverseDirectionParams<T>& p) {
  const auto& k = kernels<T>();
  const int64_t B = p.rows, D = p.cols;
  const StepScalars<T>& s = p.s;
  const T M = s.max_grad_norm;
  const T n_mu = p.grad_norms[0], n_lv = p.grad_norms[1];
  const T c_mu = math::clip_coef(n_mu, M), c_lv = math::clip_coef(n_lv, M);
  const bool clipped = c_mu < T(1) || c_lv < T(1);

  // Where clipping was active: pass 1, pbar += lr * lbar and the dot products g . pbar
  // the clip Jacobian needs. Without it the row pass makes pbar' itself (one pass).
  T k_mu = 0, k_lv = 0;
  if (clipped) {
    std::vector<double> part(2 * B, 0.0);
    parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
      k.reverse_dots_rows(p.lbar_mu, p.lbar_logvar, p.pbar_mu, p.pbar_logvar, p.grad_z, p.mu, p.logvar, p.eps,
                          s.scale, s.kl_weight, s.lr_mu, s.lr_logvar, p.pbar_mu_out, p.pbar_logvar_out,
                          part.data(), b0, b1, D);
    });
    const auto [dm, dl] = ordered_sum(part, B);
    k_mu = math::clip_jacobian_kappa(n_mu, M, T(dm));
    k_lv = math::clip_jacobian_kappa(n_lv, M, T(dl));
  }

  // Row-wise: (pbar'), v = J pbar', u, and the evaluation points.
  std::vector<double> uu(B), zz(B);
  const T z_step = p.fd_mode == FdMode::kForward ? p.fd_step : T(0);
  parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
    k.reverse_rows(p.lbar_mu, p.lbar_logvar, p.pbar_mu, p.pbar_logvar, s.lr_mu, s.lr_logvar, p.pbar_mu_out,
                   p.pbar_logvar_out, p.grad_z, p.mu, p.logvar, p.eps, s.scale, s.kl_weight, c_mu, c_lv, k_mu, k_lv,
                   clipped, z_step, p.v_mu, p.v_logvar, p.u, p.z_eval, uu.data(), zz.data(), b0, b1, D);
  });
  if (p.fd_mode == FdMode::kCentral) {
    std::vector<T> r(B);
    for (int64_t b = 0; b < B; ++b)
      math::central_step(T(std::sqrt(zz[b])), T(std::sqrt(uu[b])), p.fd_step, &r[b], &p.row_weight[b]);
    parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
      k.central_points(p.u, r.data(), p.z_eval, p.z_eval + B * D, b0, b1, D);
    });
  } else {
    std::fill(p.row_weight, p.row_weight + B, T(1));
  }
}

template <typename T>
void reverse_update_rows(const ReverseUpdateParams<T>& p) {
  const auto& k = kernels<T>();
  const StepScalars<T>& s = p.s;
  parallel_for(0, p.numel, 1 << 14, [&](int64_t i0, int64_t i1) {
    k.reverse_update(p.lbar_mu, p.lbar_logvar, p.pbar_mu, p.pbar_logvar, p.v_mu, p.v_logvar, p.logvar, p.eps,
                     p.grad_z, p.hvp_a, p.hvp_b, p.hvp_scale, s.scale, s.kl_weight, s.momentum, p.lbar_mu_out,
                     p.lbar_logvar_out, p.pbar_mu_out, p.pbar_logvar_out, i0, i1);
  });
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

// Half and bfloat16: computed in float, rounded once (as torch's add).
template <typename T>
void accumulate_kernel(T* __restrict__ total, const T* __restrict__ value, int64_t n) {
  for (int64_t j = 0; j < n; ++j) total[j] = T(float(total[j]) + float(value[j]));
}

SAVAE_CPU_CLONES void accumulate_kernel(float* __restrict__ total, const float* __restrict__ value, int64_t n) {
  for (int64_t j = 0; j < n; ++j) total[j] += value[j];
}

SAVAE_CPU_CLONES void accumulate_kernel(double* __restrict__ total, const double* __restrict__ value, int64_t n) {
  for (int64_t j = 0; j < n; ++j) total[j] += value[j];
}

// All tensors of one dtype in one parallel region (fixed-size chunks of every
// tensor): one call per refinement step instead of one dispatch per parameter.
template <typename T>
void accumulate_items(const std::vector<AccumulateItem>& items) {
  struct Chunk {
    size_t item;
    int64_t begin, end;
  };
  constexpr int64_t kChunk = 1 << 13;
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < items.size(); ++i)
    for (int64_t b = 0; b < items[i].numel; b += kChunk)
      chunks.push_back({i, b, std::min<int64_t>(b + kChunk, items[i].numel)});
  parallel_for(0, int64_t(chunks.size()), 2, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      accumulate_kernel(static_cast<T*>(items[ch.item].total) + ch.begin,
                        static_cast<const T*>(items[ch.item].value) + ch.begin, ch.end - ch.begin);
    }
  });
}

struct CpuBackend {
  static constexpr const char* kName = "CPU";
  static int64_t partials_rows(int64_t) { return 0; }
  static bool on_device(const torch::stable::Tensor& t) { return t.is_cpu(); }
  struct Guard {
    explicit Guard(const torch::stable::Tensor&) {}
  };
  template <typename T>
  static void sample(const SampleParams<T>& p) { sample_rows(p); }
  template <typename T>
  static void forward_step(const ForwardStepParams<T>& p) { forward_step_rows(p); }
  template <typename T>
  static void reverse_direction(const ReverseDirectionParams<T>& p) { reverse_direction_rows(p); }
  template <typename T>
  static void reverse_update(const ReverseUpdateParams<T>& p) { reverse_update_rows(p); }
  static void accumulate(ops::ScalarType dtype, const std::vector<AccumulateItem>& items) {
    switch (dtype) {
      case ops::ScalarType::Float: return accumulate_items<float>(items);
      case ops::ScalarType::Double: return accumulate_items<double>(items);
      case ops::ScalarType::Half: return accumulate_items<torch::headeronly::Half>(items);
      case ops::ScalarType::BFloat16: return accumulate_items<torch::headeronly::BFloat16>(items);
      default: STD_TORCH_CHECK(false, "savae_fast::accumulate_: unsupported dtype ", ops::dtype_str(dtype));
    }
  }
};

}  // namespace

namespace cpu {
bool vector_kernels_enabled() { return vector_flag().load(); }
bool vector_kernels_compiled() { return cpu_has_avx2() && avx2_table_float() != nullptr; }
void set_vector_kernels(bool enabled) {
  STD_TORCH_CHECK(!enabled || vector_kernels_compiled(),
              "savae_fast: the vectorised CPU kernels need AVX2+FMA (and a GCC x86-64 build)");
  vector_flag().store(enabled);
}
}  // namespace cpu

STABLE_TORCH_LIBRARY_IMPL(savae_fast, CPU, m) { ops::register_backend<CpuBackend>(m); }

}  // namespace savae_fast
