// The CPU kernel loops of kernels.h built for AVX2 + FMA on the vector types
// of vec_avx2.h (our own exp / expm1), selected at run time when the CPU
// supports them.
//
// setuptools cannot give one source file its own compiler flags, so the target
// is set with a pragma. Only code templated on the vector type is instantiated
// here, through raw-pointer functions, so no inline function shared with the
// portable build is compiled with AVX2 instructions.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SAVAE_FAST_NO_AVX2)
#pragma GCC target("avx,avx2,fma")

#include "kernels.h"
#include "vec_avx2.h"

namespace savae_fast {
namespace math {

template <typename T>
struct Elementwise<cpu::Vec<T>> {
  static cpu::Vec<T> exp(cpu::Vec<T> x) { return cpu::exp(x); }
  static cpu::Vec<T> expm1(cpu::Vec<T> x) { return cpu::expm1(x); }
};

}  // namespace math

namespace cpu {

template <typename T>
struct VecOps<Vec<T>> {
  using V = Vec<T>;
  static constexpr int size = V::size;
  static V load(const T* p, int n) { return V::load(p, n); }
  static void store(T* p, V v, int n) { v.store(p, n); }
  static double hsum(V v) { return v.hsum(); }
};

const KernelTable<float>* avx2_table_float() {
  static const KernelTable<float> table = Loops<float, Vec<float>>::table();
  return &table;
}

const KernelTable<double>* avx2_table_double() {
  static const KernelTable<double> table = Loops<double, Vec<double>>::table();
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
