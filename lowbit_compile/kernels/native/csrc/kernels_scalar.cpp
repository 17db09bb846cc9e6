// Portable scalar kernels: the fallback on any CPU, and the oracle the SIMD kernels are tested against.
#include "lowbit_native.h"

namespace lowbit_native {
namespace {

void decode_unit(const uint8_t* unit, int bits, uint8_t* codes) {
  for (int p = 0; p < kUnit; ++p) codes[p] = unit_code(unit, bits, p);
}

void dot_int8(const Weights& w, int64_t n0, int64_t n1, const QuantizedRow* x, int64_t rows, float* y,
              int64_t ldy) {
  const int64_t units = w.k_pad / kUnit;
  uint8_t codes[kUnit];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * w.row_stride;
    const float* s = w.scales + n * w.groups;
    for (int64_t m = 0; m < rows; ++m) {
      const QuantizedRow& a = x[m];
      float total = 0.f, acc = 0.f;
      int64_t g = 0, left = w.blocks_per_group;
      for (int64_t u = 0; u < units; ++u) {
        decode_unit(row + u * unit_bytes(w.bits), w.bits, codes);
        for (int i = 0; i < kUnit / kBlock; ++i) {
          const int64_t b = u * (kUnit / kBlock) + i;
          const int8_t* q = a.q + b * kBlock;
          int32_t dot = 0;
          for (int j = 0; j < kBlock; ++j) dot += int32_t(codes[i * kBlock + j]) * q[j];
          acc += a.d[b] * float(dot);
          if (--left == 0) {
            total += acc * s[g];
            acc = 0.f;
            left = w.blocks_per_group;
            if (g + 1 < w.groups) ++g;
          }
        }
      }
      total += acc * s[g];
      float zero_term = 0.f;
      for (int64_t gg = 0; gg < w.groups; ++gg) zero_term += s[gg] * a.gsum[gg];
      y[m * ldy + n] = total - w.zero * zero_term;
    }
  }
}

// Unit u of row n as the reference float32 weights (c − zero)·s.
void decode_rows_unit(const Weights& w, int64_t n, int64_t u, float* out) {
  uint8_t codes[kUnit];
  decode_unit(w.packed + n * w.row_stride + u * unit_bytes(w.bits), w.bits, codes);
  const float* s = w.scales + n * w.groups;
  for (int p = 0; p < kUnit; ++p)
    out[p] = (float(codes[p]) - w.zero) * s[group_of_block(w, (u * kUnit + p) / kBlock)];
}

void decode_rows(const Weights& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t u = 0; u < w.k_pad / kUnit; ++u) decode_rows_unit(w, n, u, out + (n - n0) * ldo + u * kUnit);
}

void dot_float(const Weights& w, int64_t n0, int64_t n1, const float* x, int64_t ldx, int64_t rows, float* y,
               int64_t ldy) {
  float row[kUnit];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < rows; ++m) {
      const float* xm = x + m * ldx;
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // eight partial sums, as the SIMD kernels keep
      for (int64_t u = 0; u < w.k_pad / kUnit; ++u) {
        decode_rows_unit(w, n, u, row);
        for (int p = 0; p < kUnit; ++p) acc[p & 7] += row[p] * xm[u * kUnit + (p & ~31) + interleave_block(p & 31)];
      }
      float sum = 0.f;
      for (int j = 0; j < 8; ++j) sum += acc[j];
      y[m * ldy + n] = sum;
    }
  }
}

// ------------------------------------------------------------------------------------------------ rotation

// H_p v in place: butterflies (a, b) -> (a + b, a − b) at distances 1, 2, 4, ..., the order the SIMD kernels keep,
// so that the power-of-two part is bit-identical on every instruction set.
void fwht_inplace(float* v, int64_t p) {
  for (int64_t h = 1; h < p; h *= 2)
    for (int64_t i = 0; i < p; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
}

void fwht(const Rotation& r, const float* x, float* w) {
  const bool pre = r.signs != nullptr && !r.transpose;
  for (int64_t i = 0; i < r.n; ++i) w[i] = pre ? x[i] * r.signs[i] : x[i];
  for (int64_t a = 0; a < r.k; ++a) fwht_inplace(w + a * r.p, r.p);
  if (r.k == 1) {
    const bool post = r.signs != nullptr && r.transpose;
    for (int64_t i = 0; i < r.n; ++i) w[i] = post ? w[i] * r.scale * r.signs[i] : w[i] * r.scale;
  }
}

void mix(const Rotation& r, const float* w, int64_t a0, int64_t a1, float* y) {
  const int64_t k = r.k, p = r.p;
  const bool post = r.signs != nullptr && r.transpose;
  for (int64_t a = a0; a < a1; ++a) {
    float* ya = y + a * p;
    for (int64_t j = 0; j < p; ++j) ya[j] = 0.f;
    for (int64_t b = 0; b < k; ++b) {
      const float f = r.f(a, b);
      for (int64_t j = 0; j < p; ++j) ya[j] += f * w[b * p + j];
    }
    for (int64_t j = 0; j < p; ++j) ya[j] = post ? ya[j] * r.scale * r.signs[a * p + j] : ya[j] * r.scale;
  }
}

}  // namespace

Kernels scalar_kernels() { return Kernels{dot_int8, decode_rows, dot_float, fwht, mix}; }

}  // namespace lowbit_native
