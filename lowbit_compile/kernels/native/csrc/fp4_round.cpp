// lowbit_native::fp4_round: formats/fp4.py's quantize (and quantize minus its input) in one pass over the tensor.
//
// The LLM-FP4 search rounds a weight or an activation tensor to FP4 for every candidate scale: in torch that is about
// ten elementwise passes (abs, divide, clamp, exponent bits, add, subtract, copysign, multiply, subtract), each over
// the whole tensor. Here every element goes through the same IEEE single-precision operations in the same order, as
// formats.fp4.quantize_unscaled spells them: q = |x| / s saturated at the format maximum; c = 1.5·2^(23 + e − M)
// built from q's exponent bits (raised to band 1 below 2); v = (q + c) − c; for M = 0, a tie 1.5·2^e with e even moves
// down (v · 0.5); v takes x's sign; then v · s, and with `minus_input` (v · s) − x. The library is built with
// -ffp-contract=off, so no two of them fuse: the result is torch's bit for bit (tests/kernels/test_fp4_round.py).
//
// lowbit_native::fp4_ints: the same rounding, giving the signed bias-0 value times `mult` as int8 (an exact small
// integer for mult = quantize.fp4.int_mult(fmt); NaN gives 0), so that products of quantized tensors can be summed
// exactly in int32.
// lowbit_native::fp4_sq_err: Σ_t (m[r, t]·c[r] − y[r, t])² per row r for an int32 product m (the search's error of
// quantized outputs against float ones), float32 terms summed in double, in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lowbit_native.h"

namespace lowbit_native {
namespace {

#define LB_NS scalar
#define LB_TARGET
#include "fp4_rows.inc"
#undef LB_NS
#undef LB_TARGET
#if defined(__x86_64__)
#define LB_NS avx2
#define LB_TARGET __attribute__((target("avx2")))
#include "fp4_rows.inc"
#undef LB_NS
#undef LB_TARGET
#define LB_NS avx512
#if defined(__clang__)
#define LB_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#else  // 512-bit vectors whatever the tuning prefers (a GCC option; clang keeps its default)
#define LB_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=512")))
#endif
#include "fp4_rows.inc"
#undef LB_NS
#undef LB_TARGET
#endif

struct RowKernels {
  decltype(&scalar::round_row) round_row;
  decltype(&scalar::ints_row) ints_row;
  decltype(&scalar::sq_err_row) sq_err_row;
};

// The loops for the instruction set the library resolves ($LOWBIT_NATIVE_ISA or the best the CPU has): the same bits
// whichever runs.
RowKernels row_kernels() {
#if defined(__x86_64__)
  const int64_t isa = resolved_isa();
  if (isa == 2) return {avx512::round_row, avx512::ints_row, avx512::sq_err_row};
  if (isa == 1) return {avx2::round_row, avx2::ints_row, avx2::sq_err_row};
#endif
  return {scalar::round_row, scalar::ints_row, scalar::sq_err_row};
}

// One float32 factor per row of a (rows, cols) tensor, or one for all rows: the scale of fp4_round and fp4_ints, c of
// fp4_sq_err.
struct RowFactor {
  at::Tensor t;
  const float* p;
  bool per_row;
  RowFactor(const at::Tensor& f, int64_t rows, const char* op, const char* name) : t(f.contiguous().reshape(-1)) {
    TORCH_CHECK(f.scalar_type() == at::kFloat, op, ": ", name, " must be float32");
    TORCH_CHECK(t.numel() == rows || t.numel() == 1, op, ": ", name, " must have one element per row, or one");
    p = t.data_ptr<float>();
    per_row = t.numel() == rows && rows != 1;
  }
  float operator[](int64_t r) const { return per_row ? p[r] : p[0]; }
};

// The checks fp4_round and fp4_ints share, and the constant of their rounding (the c of round_magnitude, less its
// exponent): 2^(23 − M) · 1.5 in exponent-field units.
uint32_t rounding_constant(const at::Tensor& x, int64_t m_bits, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous (rows, cols) matrix");
  TORCH_CHECK(m_bits >= 0 && m_bits <= 2, op, ": m_bits must be 0, 1 or 2");
  return (static_cast<uint32_t>(23 - m_bits) << 23) | 0x400000u;
}

// fp4_round(x float32 (R, C) contiguous, scale float32 with R or 1 elements, m_bits, max_value, minus_input)
//   -> float32 (R, C): quantize(x, fmt, scale) [- x]
at::Tensor fp4_round(const at::Tensor& x, const at::Tensor& scale, int64_t m_bits, double max_value,
                     bool minus_input) {
  const uint32_t c_add = rounding_constant(x, m_bits, "fp4_round");
  const int64_t rows = x.size(0), cols = x.size(1);
  const RowFactor s(scale, rows, "fp4_round", "scale");
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float maxv = static_cast<float>(max_value);
  const RowKernels k = row_kernels();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      k.round_row(xp + r * cols, op + r * cols, cols, s[r], maxv, c_add, m_bits == 0, minus_input);
  });
  return out;
}

// fp4_ints(x float32 (R, C) contiguous, finite; scale float32 with R or 1 elements, m_bits, max_value, mult)
//   -> int8 (R, C): the signed bias-0 value of quantize(x, fmt, scale), times mult
at::Tensor fp4_ints(const at::Tensor& x, const at::Tensor& scale, int64_t m_bits, double max_value, double mult) {
  const uint32_t c_add = rounding_constant(x, m_bits, "fp4_ints");
  TORCH_CHECK(max_value * mult <= 127.0, "fp4_ints: max_value * mult must fit int8");
  const int64_t rows = x.size(0), cols = x.size(1);
  const RowFactor s(scale, rows, "fp4_ints", "scale");
  at::Tensor out = at::empty({rows, cols}, x.options().dtype(at::kChar));
  const float* xp = x.data_ptr<float>();
  int8_t* op = out.data_ptr<int8_t>();
  const float maxv = static_cast<float>(max_value), fm = static_cast<float>(mult);
  const RowKernels k = row_kernels();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) k.ints_row(xp + r * cols, op + r * cols, cols, s[r], maxv, c_add, m_bits == 0, fm);
  });
  return out;
}

// fp4_sq_err(m int32 (R, T) contiguous, c float32 (R or 1 elements), y float32 (R, T) contiguous) -> float64 (R):
//   out[r] = Σ_t d², d = float32(m[r, t]) · c[r] − y[r, t] in float32, d² summed in double by eight running sums
//   (t mod 8), added in a fixed order: the same value on every machine.
at::Tensor fp4_sq_err(const at::Tensor& m, const at::Tensor& c, const at::Tensor& y) {
  TORCH_CHECK(m.scalar_type() == at::kInt && m.dim() == 2 && m.is_contiguous(),
              "fp4_sq_err: m must be a contiguous int32 (rows, cols) matrix");
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.sizes() == m.sizes() && y.is_contiguous(),
              "fp4_sq_err: y must be a contiguous float32 matrix of m's shape");
  const int64_t rows = m.size(0), cols = m.size(1);
  const RowFactor cr(c, rows, "fp4_sq_err", "c");
  at::Tensor out = at::empty({rows}, y.options().dtype(at::kDouble));
  const int32_t* mp = m.data_ptr<int32_t>();
  const float* yp = y.data_ptr<float>();
  double* op = out.data_ptr<double>();
  const RowKernels k = row_kernels();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = k.sq_err_row(mp + r * cols, yp + r * cols, cols, cr[r]);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_native, m) {
  m.def("fp4_round(Tensor x, Tensor scale, int m_bits, float max_value, bool minus_input) -> Tensor");
  m.def("fp4_ints(Tensor x, Tensor scale, int m_bits, float max_value, float mult) -> Tensor");
  m.def("fp4_sq_err(Tensor m, Tensor c, Tensor y) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_native, CPU, m) {
  m.impl("fp4_round", &fp4_round);
  m.impl("fp4_ints", &fp4_ints);
  m.impl("fp4_sq_err", &fp4_sq_err);
}

}  // namespace lowbit_native
