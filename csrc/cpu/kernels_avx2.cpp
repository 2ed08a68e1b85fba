// The CPU kernel loops of kernels.h built for AVX2 + FMA with ATen's
// at::vec::Vectorized<T> (exp/expm1 from Sleef, as ATen's own CPU kernels),
// selected at run time when the CPU supports it.
//
// setuptools cannot give one source file its own compiler flags, so the target
// is set with a pragma; the macros below tell ATen's and Sleef's headers what
// the pragma enables. Only code templated on the vector type is instantiated
// here, through raw-pointer functions, so no inline function shared with the
// portable build is compiled with AVX2 instructions.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SAVAE_FAST_NO_AVX2)
#pragma GCC target("avx,avx2,fma,f16c")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include <ATen/cpu/vec/vec.h>

#include "kernels.h"

namespace savae_fast {
namespace math {

template <typename T>
struct Elementwise<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V exp(V x) { return x.exp(); }
  static V expm1(V x) { return x.expm1(); }
};

}  // namespace math

namespace cpu {

template <typename T>
struct VecOps<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static constexpr int size = V::size();
  static V load(const T* p, int n) { return n == size ? V::loadu(p) : V::loadu(p, n); }
  static void store(T* p, V v, int n) { n == size ? v.store(p) : v.store(p, n); }
  static double hsum(V v) {
    T lanes[size];
    v.store(lanes);
    double acc = 0;
    for (int i = 0; i < size; ++i) acc += double(lanes[i]);
    return acc;
  }
};

const KernelTable<float>* avx2_table_float() {
  static const KernelTable<float> table = Loops<float, at::vec::Vectorized<float>>::table();
  return &table;
}

const KernelTable<double>* avx2_table_double() {
  static const KernelTable<double> table = Loops<double, at::vec::Vectorized<double>>::table();
  return &table;
}

}  // namespace cpu
}  // namespace savae_fast

#else

#include "kernels.h"

namespace savae_fast {
namespace cpu {
const KernelTable<float>* avx2_table_float() { return nullptr; }
const KernelTable<double>* avx2_table_double() { return nullptr; }
}  // namespace cpu
}  // namespace savae_fast

#endif
