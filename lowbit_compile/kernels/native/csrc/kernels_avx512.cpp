// AVX-512 kernels: the 256-bit kernels of kernels_simd.inc and hadamard_simd.inc compiled with AVX-512F/BW/VL/DQ
// (EVEX encodings, 32 vector registers), and a second copy of the linear kernels whose int8 dot products use
// AVX512-VNNI (vpdpbusd: one instruction for vpmaddubsw + vpmaddwd, the same lane sums since vpmaddubsw never
// saturates here).
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#include "lowbit_native.h"

namespace lowbit_native {

#define LB_NS avx512
#define LB_TARGET __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))
#define LB_VNNI 0
#include "kernels_simd.inc"
#include "hadamard_simd.inc"
#undef LB_NS
#undef LB_TARGET
#undef LB_VNNI

#define LB_NS avx512vnni
#define LB_TARGET __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define LB_VNNI 1
#include "kernels_simd.inc"
#undef LB_NS
#undef LB_TARGET
#undef LB_VNNI

Kernels avx512_kernels(bool vnni) {
  // The rotation has no integer dot product: the one AVX-512 copy serves both.
  if (vnni)
    return Kernels{avx512vnni::dot_int8, avx512vnni::decode_rows, avx512vnni::dot_float, avx512::fwht, avx512::mix};
  return Kernels{avx512::dot_int8, avx512::decode_rows, avx512::dot_float, avx512::fwht, avx512::mix};
}

}  // namespace lowbit_native
#endif  // __x86_64__
