// AVX2 + FMA kernels (kernels_simd.inc, hadamard_simd.inc), compiled for that instruction set only through the
// function attribute: the library itself targets baseline x86-64 and runs these only where the CPU has AVX2 and FMA.
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#include "lowbit_native.h"

namespace lowbit_native {

#define LB_NS avx2
#define LB_TARGET __attribute__((target("avx2,fma")))
#define LB_VNNI 0
#include "kernels_simd.inc"
#include "hadamard_simd.inc"
#undef LB_NS
#undef LB_TARGET
#undef LB_VNNI

Kernels avx2_kernels() {
  return Kernels{avx2::dot_int8, avx2::decode_rows, avx2::dot_float, avx2::fwht, avx2::mix};
}

}  // namespace lowbit_native
#endif  // __x86_64__
