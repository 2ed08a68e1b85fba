// AVX2 + FMA vectors of float (8 lanes) and double (4 lanes) with the few
// operations the CPU kernels use, including exp and expm1 accurate to about
// one ulp (Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2, Taylor
// polynomial of e^r or e^r - 1, scaling by 2^k in two halves so that neither
// half overflows before the product does). Tested against long double libm in
// csrc/tests/test_vec_avx2.cpp.
//
// Include only from a translation unit compiled for AVX2 + FMA (a target
// pragma or -mavx2 -mfma): every function here is inline and uses those
// instructions.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace savae_fast {
namespace cpu {

// A vector of 32 bytes of T (8 floats or 4 doubles) as a GCC/Clang vector type:
// + - * and comparisons element-wise; the few operations the language has no
// operator for use AVX/FMA intrinsics.
template <typename T>
struct Vec {
  typedef T Reg __attribute__((vector_size(32)));
  using Int = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef Int IntReg __attribute__((vector_size(32)));
  static constexpr int size = 32 / sizeof(T);
  Reg v;

  Vec() = default;
  Vec(Reg x) : v(x) {}                 // NOLINT(google-explicit-constructor)
  Vec(double x) : v(Reg{} + T(x)) {}   // NOLINT: broadcast, as T(0.5) in the formulas

  // n < size: lanes past n read as zero.
  static Vec load(const T* p, int n) {
    Reg r{};
    std::memcpy(&r, p, sizeof(T) * n);
    return r;
  }
  void store(T* p, int n) const { std::memcpy(p, &v, sizeof(T) * n); }
  // Lanes summed in order, in double (the rows' partial sums of the reductions).
  double hsum() const {
    double acc = 0;
    for (int i = 0; i < size; ++i) acc += double(v[i]);
    return acc;
  }

  static Vec fma(Vec a, Vec b, Vec c) {
    if constexpr (sizeof(T) == 4) return Reg(_mm256_fmadd_ps(a.v, b.v, c.v));
    else return Reg(_mm256_fmadd_pd(a.v, b.v, c.v));
  }
  // To the nearest integer, ties to even.
  static Vec round(Vec x) {
    constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    if constexpr (sizeof(T) == 4) return Reg(_mm256_round_ps(x.v, mode));
    else return Reg(_mm256_round_pd(x.v, mode));
  }
  // min(hi, max(lo, x)); NaN stays NaN (every comparison with it is false).
  static Vec clamp(Vec x, T lo, T hi) {
    const Reg low = x.v < lo ? Reg{} + lo : x.v;
    return low > hi ? Reg{} + hi : low;
  }
  static Vec min(Vec a, T b) { return a.v > b ? Reg{} + b : a.v; }
  // floor(k / 2) for integral k: k / 2 - 1/4 is never a tie, so it rounds to the floor.
  static Vec half_floor(Vec k) { return round(Vec(k.v * T(0.5) - T(0.25))); }
  // 2^k for integral k within the normal exponents: the exponent field, built directly.
  static Vec pow2(Vec k) {
    constexpr Int bias = std::numeric_limits<T>::max_exponent - 1;  // 127, 1023
    constexpr int mantissa = std::numeric_limits<T>::digits - 1;    // 23, 52
    const IntReg e = (__builtin_convertvector(k.v, IntReg) + bias) << mantissa;
    return (Reg)e;  // same-size vector cast: the bits, reinterpreted
  }
};

template <typename T>
inline Vec<T> operator+(Vec<T> a, Vec<T> b) { return Vec<T>(a.v + b.v); }
template <typename T>
inline Vec<T> operator-(Vec<T> a, Vec<T> b) { return Vec<T>(a.v - b.v); }
template <typename T>
inline Vec<T> operator*(Vec<T> a, Vec<T> b) { return Vec<T>(a.v * b.v); }

// Constants of the reduction and the polynomial degree per element type.
template <typename T>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f;  // few mantissa bits: k * ln2_hi is exact
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr float exp_lo = -104.0f, exp_hi = 88.8f;  // e^x is 0 / inf beyond
  static constexpr float expm1_lo = -20.0f;                 // e^x - 1 rounds to -1 below
  static constexpr float expm1_k_max = 30.0f;               // 1 - 2^-k rounds to 1 above
  static constexpr int degree = 8;                          // r^9 / 9! < 2^-24 r for |r| <= ln2 / 2
};

template <>
struct ExpConstants<double> {
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 6.93147180369123816490e-01;
  static constexpr double ln2_lo = 1.90821492927058770002e-10;
  static constexpr double exp_lo = -746.0, exp_hi = 709.8;
  static constexpr double expm1_lo = -40.0;
  static constexpr double expm1_k_max = 60.0;
  static constexpr int degree = 14;  // r^15 / 15! < 2^-53 r
};

// 1 / n! for n = 0..kMaxDegree, computed by the compiler.
constexpr int kMaxDegree = 14;
struct InverseFactorials {
  double v[kMaxDegree + 1];
  constexpr InverseFactorials() : v() {
    v[0] = 1;
    for (int i = 1; i <= kMaxDegree; ++i) v[i] = v[i - 1] / i;
  }
};
constexpr InverseFactorials kInvFact{};  // internal linkage: data local to the file

// e^r - 1 for |r| <= ln2 / 2: r + r^2 (1/2! + r (1/3! + ... + r / degree!)).
template <typename T>
inline Vec<T> expm1_reduced(Vec<T> r) {
  constexpr int degree = ExpConstants<T>::degree;
  static_assert(degree <= kMaxDegree);
  Vec<T> p(kInvFact.v[degree]);
  for (int i = degree - 1; i >= 2; --i) p = Vec<T>::fma(p, r, Vec<T>(kInvFact.v[i]));
  return Vec<T>::fma(p, r * r, r);
}

// x = k ln2 + r with k integral, |r| <= ln2 / 2 (x already clamped).
template <typename T>
inline Vec<T> reduce(Vec<T> x, Vec<T>* k) {
  using C = ExpConstants<T>;
  *k = Vec<T>::round(x * Vec<T>(C::log2e));
  const Vec<T> r = Vec<T>::fma(*k, Vec<T>(-C::ln2_hi), x);
  return Vec<T>::fma(*k, Vec<T>(-C::ln2_lo), r);
}

// y * 2^k in two factors 2^floor(k/2), 2^(k - floor(k/2)): each is a normal
// number over the whole clamped range, the product over- or underflows as e^x does.
template <typename T>
inline Vec<T> scale_pow2(Vec<T> y, Vec<T> k) {
  const Vec<T> k1 = Vec<T>::half_floor(k);
  return (y * Vec<T>::pow2(k1)) * Vec<T>::pow2(k - k1);
}

template <typename T>
inline Vec<T> exp(Vec<T> x) {
  using C = ExpConstants<T>;
  Vec<T> k;
  const Vec<T> r = reduce(Vec<T>::clamp(x, C::exp_lo, C::exp_hi), &k);
  return scale_pow2(expm1_reduced(r) + Vec<T>(1.0), k);
}

// e^x - 1 = 2^k (p + 1 - 2^-k) with p = e^r - 1: no cancellation for small x
// (k = 0 gives p itself), one rounding in the sum otherwise.
template <typename T>
inline Vec<T> expm1(Vec<T> x) {
  using C = ExpConstants<T>;
  Vec<T> k;
  const Vec<T> r = reduce(Vec<T>::clamp(x, C::expm1_lo, C::exp_hi), &k);
  const Vec<T> one_minus = Vec<T>(1.0) - Vec<T>::pow2(Vec<T>(0.0) - Vec<T>::min(k, C::expm1_k_max));
  return scale_pow2(expm1_reduced(r) + one_minus, k);
}

}  // namespace cpu
}  // namespace savae_fast
