// lowbit_native::fp4_round: formats/fp4.py's quantize (and quantize minus its input) in one pass over the tensor.
//
// The LLM-FP4 search rounds a weight or an activation tensor to FP4 for every candidate scale: in torch that is about
// ten elementwise passes (abs, divide, clamp, exponent bits, add, subtract, copysign, multiply, subtract), each over
// the whole tensor. Here every element goes through the same IEEE single-precision operations in the same order, as
// formats.fp4.quantize_unscaled spells them: q = |x| / s saturated at the format maximum; c = 1.5·2^(23 + e − M)
// built from q's exponent bits (raised to band 1 below 2); v = (q + c) − c; for M = 0, a tie 1.5·2^e with e even moves
// down (v · 0.5); v takes x's sign; then v · s, and with `minus_input` (v · s) − x. The library is built with
// -ffp-contract=off, so no two of them fuse: the result is torch's bit for bit (tests/kernels/test_fp4_round.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace lowbit_native {
namespace {

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// One row of n elements at scale s.
void round_row(const float* x, float* out, int64_t n, float s, float max_value, uint32_t c_add, bool e3m0,
               bool minus_input) {
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    float q = std::fabs(xi) / s;
    q = q > max_value ? max_value : q;  // clamp_(max=...): NaN stays NaN
    const uint32_t qb = float_to_bits(q);
    uint32_t cb = qb & 0x7F800000u;
    cb = cb < (128u << 23) ? (128u << 23) : cb;
    const float c = bits_to_float(cb + c_add);
    float v = (q + c) - c;
    if (e3m0 && (qb & 0x40FFFFFFu) == 0x40C00000u) v = v * 0.5f;
    v = std::copysign(v, xi);
    const float y = v * s;
    out[i] = minus_input ? y - xi : y;
  }
}

// fp4_round(x float32 (R, C) contiguous, scale float32 with R or 1 elements, m_bits, max_value, minus_input)
//   -> float32 (R, C): quantize(x, fmt, scale) [- x]
at::Tensor fp4_round(const at::Tensor& x, const at::Tensor& scale, int64_t m_bits, double max_value,
                     bool minus_input) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat,
              "fp4_round: x and scale must be float32");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "fp4_round: x must be a contiguous (rows, cols) matrix");
  TORCH_CHECK(m_bits >= 0 && m_bits <= 2, "fp4_round: m_bits must be 0, 1 or 2");
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor s = scale.contiguous().reshape(-1);
  TORCH_CHECK(s.numel() == rows || s.numel() == 1, "fp4_round: scale must have one element per row, or one");
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool per_row = s.numel() == rows && rows != 1;
  const uint32_t c_add = (static_cast<uint32_t>(23 - m_bits) << 23) | 0x400000u;
  const float maxv = static_cast<float>(max_value);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      round_row(xp + r * cols, op + r * cols, cols, per_row ? sp[r] : sp[0], maxv, c_add, m_bits == 0, minus_input);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_native, m) {
  m.def("fp4_round(Tensor x, Tensor scale, int m_bits, float max_value, bool minus_input) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_native, CPU, m) { m.impl("fp4_round", &fp4_round); }

}  // namespace lowbit_native
