// lowbit_native::ldlq: the column loop of quantize/ldlq.py's ldlq_factored, without Python between the columns.
//
// The Python loop spends ~80 µs per column in interpreter and dispatch overhead (ten small tensor ops), two orders of
// magnitude more than the arithmetic on a few hundred rows. Here every step is the same operation in the same order:
// the block feedback GEMM and the per-column GEMV are the very ATen calls the Python code makes (same views, same
// BLAS kernels, so the same sums), and the elementwise rounding is spelled out in IEEE operations that match ATen's
// one for one (divide, add the zero, clamp, round half to even by adding and subtracting 1.5·2^mantissa, subtract the
// zero, multiply by the scale). The library is built with -ffp-contract=off, so no FMA fuses two of them. The codes
// and the loss are therefore bit for bit the Python loop's (tests/quantize/test_ldlq_native.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

namespace lowbit_native {
namespace {

template <typename T>
struct Rounder;
template <>
struct Rounder<float> {
  static constexpr float value = 1.5f * 8388608.0f;  // 1.5 · 2^23
};
template <>
struct Rounder<double> {
  static constexpr double value = 1.5 * 4503599627370496.0;  // 1.5 · 2^52
};

// One column: codes_k = round(clamp(a / s + zero, 0, max_code)); w_hat = (codes_k − zero) · s;
// e_k = w_k − w_hat; a −= w_hat (A_k − Ŵ_k, for the loss). -ffp-contract=off keeps each operation rounded on its own.
template <typename T>
void round_column(T* a, const T* s, const T* w, T* e, uint8_t* codes, int64_t rows, T zero, T max_code) {
  const T m = Rounder<T>::value;
  for (int64_t r = 0; r < rows; ++r) {
    T v = a[r] / s[r] + zero;
    v = v < T(0) ? T(0) : (v > max_code ? max_code : v);  // clamp_(0, max_code); v is never NaN for finite inputs
    v = (v + m) - m;
    codes[r] = static_cast<uint8_t>(v);
    const T w_hat = (v - zero) * s[r];
    e[r] = w[r] - w_hat;
    a[r] = a[r] - w_hat;
  }
}

template <typename T>
void ldlq_columns(const at::Tensor& wt, const at::Tensor& ut, const at::Tensor& d, const at::Tensor& st,
                  int64_t per_group, double zero_d, double max_code_d, int64_t block, at::Tensor& et,
                  at::Tensor& codes, at::Tensor& loss) {
  const int64_t n = wt.size(0), rows = wt.size(1);
  const T zero = static_cast<T>(zero_d), max_code = static_cast<T>(max_code_d);
  // wt, et, st and codes are contiguous with `rows` entries per row: column k's data by pointer arithmetic, no
  // tensor views per column (only the GEMV needs them)
  const T* w_p = wt.data_ptr<T>();
  const T* s_p = st.data_ptr<T>();
  T* e_p = et.data_ptr<T>();
  uint8_t* c_p = codes.data_ptr<uint8_t>();
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    const int64_t b1 = std::min(b0 + block, n);
    // at = W_blockᵀ + Ůᵀ_{block, <b0} (W − Ŵ)_{<b0}: feedback from all earlier blocks in one GEMM
    at::Tensor at_ = b0 ? at::addmm(wt.slice(0, b0, b1), ut.slice(0, b0, b1).slice(1, 0, b0), et.slice(0, 0, b0))
                        : wt.slice(0, b0, b1).clone();
    for (int64_t k = b0; k < b1; ++k) {
      at::Tensor a = at_.select(0, k - b0);
      if (k > b0) a.addmv_(et.slice(0, b0, k).t(), ut.select(0, k).slice(0, b0, k));
      round_column<T>(a.data_ptr<T>(), s_p + (k / per_group) * rows, w_p + k * rows, e_p + k * rows, c_p + k * rows,
                      rows, zero, max_code);
    }
    loss.add_((at_.square_() * d.slice(0, b0, b1).unsqueeze(1)).sum(0));
  }
}

// ldlq(wt (n, rows) contiguous, ut (n, n) [any strides: ut[k, j] = Ů[j, k]], d (n), st (groups, rows) contiguous,
// per_group, zero, max_code, block) -> (codes (n, rows) uint8, loss (rows) float64); wt/ut/d/st share one dtype,
// float32 or float64.
std::tuple<at::Tensor, at::Tensor> ldlq(const at::Tensor& wt, const at::Tensor& ut, const at::Tensor& d,
                                        const at::Tensor& st, int64_t per_group, double zero, double max_code,
                                        int64_t block) {
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous(), "ldlq: wt must be a contiguous (n, rows) matrix");
  TORCH_CHECK(st.dim() == 2 && st.is_contiguous() && st.size(1) == wt.size(1),
              "ldlq: st must be a contiguous (groups, rows) matrix with wt's rows");
  TORCH_CHECK(ut.dim() == 2 && ut.size(0) == wt.size(0) && ut.size(1) == wt.size(0), "ldlq: ut must be (n, n)");
  TORCH_CHECK(d.dim() == 1 && d.size(0) == wt.size(0), "ldlq: d must have n entries");
  TORCH_CHECK(per_group > 0 && st.size(0) * per_group == wt.size(0), "ldlq: st's groups times per_group must be n");
  TORCH_CHECK(block > 0, "ldlq: block must be positive");
  const auto dt = wt.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "ldlq: float32 or float64 only");
  TORCH_CHECK(ut.scalar_type() == dt && d.scalar_type() == dt && st.scalar_type() == dt,
              "ldlq: wt, ut, d and st must share one dtype");
  at::Tensor et = at::empty_like(wt);
  at::Tensor codes = at::empty({wt.size(0), wt.size(1)}, wt.options().dtype(at::kByte));
  at::Tensor loss = at::zeros({wt.size(1)}, wt.options().dtype(at::kDouble));
  if (dt == at::kFloat)
    ldlq_columns<float>(wt, ut, d, st, per_group, zero, max_code, block, et, codes, loss);
  else
    ldlq_columns<double>(wt, ut, d, st, per_group, zero, max_code, block, et, codes, loss);
  return {codes, loss};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_native, m) {
  m.def("ldlq(Tensor wt, Tensor ut, Tensor d, Tensor st, int per_group, float zero, float max_code, int block) -> "
        "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lowbit_native, CPU, m) { m.impl("ldlq", &ldlq); }

}  // namespace lowbit_native
