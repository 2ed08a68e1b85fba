// Accuracy of the AVX2 exp / expm1 of csrc/cpu/vec_avx2.h against long double
// libm, in ulps of the element type, over the whole range (overflow, underflow
// and subnormal results, tiny arguments, infinities, NaN). Built with
// -mavx2 -mfma; exits 77 (skipped) on a CPU without them.
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "cpu/vec_avx2.h"

namespace {

using savae_fast::cpu::Vec;

template <typename T>
double ulp_error(T got, long double want) {
  const T w = T(want);
  if (std::isnan(w)) return std::isnan(got) ? 0.0 : 1e30;
  if (std::isinf(w)) return got == w ? 0.0 : 1e30;
  if (std::isinf(got)) return 1e30;
  const T aw = std::fabs(w);
  const long double ulp = (long double)(std::nextafter(aw, std::numeric_limits<T>::infinity()) - aw);
  return double(std::fabs((long double)got - want) / ulp);
}

template <typename T>
std::vector<T> arguments(T lo, T hi) {
  std::vector<T> xs;
  const int n = 200000;
  for (int i = 0; i <= n; ++i) xs.push_back(lo + (hi - lo) * T(i) / T(n));
  for (T m = T(1); m > T(1e-30); m *= T(0.61)) {  // tiny arguments, both signs
    xs.push_back(m);
    xs.push_back(-m);
  }
  const T inf = std::numeric_limits<T>::infinity();
  for (T x : {T(0), -T(0), inf, -inf, std::numeric_limits<T>::quiet_NaN(), T(88.7228), T(709.782), T(-87.3),
              T(-708.4), T(-745.1), T(-103.9)})
    xs.push_back(x);
  return xs;
}

template <typename T>
int check(const char* name, T lo, T hi, double max_ulps) {
  const auto xs = arguments(lo, hi);
  constexpr int W = Vec<T>::size;
  double worst_exp = 0, worst_expm1 = 0;
  T at_exp = 0, at_expm1 = 0;
  for (size_t i = 0; i < xs.size(); i += W) {
    const int n = int(std::min<size_t>(W, xs.size() - i));
    T e[W], m[W];
    savae_fast::cpu::exp(Vec<T>::load(&xs[i], n)).store(e, n);
    savae_fast::cpu::expm1(Vec<T>::load(&xs[i], n)).store(m, n);
    for (int j = 0; j < n; ++j) {
      const long double x = xs[i + j];
      const double ee = ulp_error(e[j], std::exp(x)), em = ulp_error(m[j], std::expm1(x));
      if (ee > worst_exp) worst_exp = ee, at_exp = xs[i + j];
      if (em > worst_expm1) worst_expm1 = em, at_expm1 = xs[i + j];
    }
  }
  std::printf("%s: exp max %.3f ulp (at %.9g), expm1 max %.3f ulp (at %.9g), %zu arguments\n", name, worst_exp,
              double(at_exp), worst_expm1, double(at_expm1), xs.size());
  return (worst_exp <= max_ulps && worst_expm1 <= max_ulps) ? 0 : 1;
}

}  // namespace

int main() {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("skipped: this CPU has no AVX2/FMA\n");
    return 77;
  }
  int failures = 0;
  failures += check<float>("float", -110.0f, 95.0f, 2.0);
  failures += check<double>("double", -750.0, 715.0, 2.0);
  std::printf(failures ? "FAILED\n" : "ok\n");
  return failures;
}
