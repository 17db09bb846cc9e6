// lowbit_native: 2/3/4-bit weight kernels for x86-64 CPUs (AVX2, AVX-512) with a portable scalar version.
//
// The packed layout (one row of the weight at a time; K is padded with code 0 to Kp, a multiple of kUnit):
// a row is Kp / 128 units of 128 consecutive codes c[0..127] (input positions 128u + p), 16·bits bytes each.
//   2-bit: 32 bytes;  byte j (0..31) = c[j] | c[32+j] << 2 | c[64+j] << 4 | c[96+j] << 6
//          so (byte >> 2i) & 3 over the 32 bytes gives block i = codes 32i .. 32i+31 in order.
//   3-bit: 48 bytes;  bytes 0..31: the 2-bit plane of c & 3 as above;
//          bytes 32..47: the high bits: byte 32+b, bit 2i+h holds c[32i + 16h + b] >> 2 (b < 16, h < 2), so
//          with the 16 bytes repeated in both 128-bit halves, lane j of block i finds its bit at 2i + j/16.
//   4-bit: 64 bytes;  byte 32h+j (h < 2, j < 32) = c[64h+j] | c[64h+32+j] << 4: nibbles of blocks 2h, 2h+1.
// Every block of 32 codes is one 32-byte vector after a shift and a mask, aligned with the blocks of 32 int8
// activations of the int8 mode.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lowbit_native {

constexpr int64_t kUnit = 128;  // codes per packing unit
constexpr int64_t kBlock = 32;  // codes per block (the int8 activation block; groups are whole blocks)

inline int64_t unit_bytes(int bits) { return 16 * bits; }
inline int64_t padded_k(int64_t k) { return (k + kUnit - 1) / kUnit * kUnit; }
inline int64_t row_bytes(int bits, int64_t k) { return padded_k(k) / kUnit * unit_bytes(bits); }

// A packed weight: row n is packed + n * row_stride; its scales are scales[n * groups + g]. Block b (32 codes)
// belongs to group min(b / blocks_per_group, groups - 1), so the padding blocks join the last group.
struct Weights {
  const uint8_t* packed;
  int64_t row_stride;
  const float* scales;
  int64_t groups;
  int64_t blocks_per_group;
  int64_t k_pad;
  int bits;
  float zero;
};

// One row of int8 activations: x̂[k] = d[k / 32] * q[k]; gsum[g] = Σ_{k in group g} x̂[k], the float sum of the
// dequantized activations (each block's d · Σq, summed in block order), used for the −zero·Σx̂ term.
struct QuantizedRow {
  const int8_t* q;     // k_pad values, zero beyond K
  const float* d;      // k_pad / 32 block scales
  const float* gsum;   // groups values
};

// A randomized Hadamard transform of a row of n = k·p values, p a power of two: with T = c · (F ⊗ H_p),
//   forward:    y = T (signs ⊙ x)
//   transpose:  y = signs ⊙ Tᵀ x
// where H_p is the Sylvester matrix (±1, applied as the unnormalized fast Walsh–Hadamard transform, p·log₂p
// additions), F a dense k × k matrix, row-major (none when k = 1): float32 (orthonormal) or int8 (the ±1 entries of
// a Hadamard matrix), and c the scale: 1/√p for a float32 F, 1/√(k·p) for an int8 one. The index of x is a·p + j:
// F mixes the k rows of p values, H_p each row.
struct Rotation {
  int64_t n, k, p;
  const float* signs;      // n values, or nullptr
  const float* factor;     // k·k values, or nullptr
  const int8_t* factor8;   // k·k values, or nullptr (at most one of factor, factor8; neither when k = 1)
  float scale;
  bool transpose;
  float f(int64_t a, int64_t b) const {  // F(a, b) as mix uses it: transposed when transpose is set
    const int64_t i = transpose ? b * k + a : a * k + b;
    return factor ? factor[i] : static_cast<float>(factor8[i]);
  }
};

// The kernels one instruction set provides. Rows [n0, n1) of the weight; everything else read-only.
struct Kernels {
  // y[m * ldy + n] = Σ_g s[n, g] · (Σ_{b in g} d_m[b] · Σ_{k in b} c[n, k] q_m[k] − zero · gsum_m[g]), for m < rows.
  void (*dot_int8)(const Weights& w, int64_t n0, int64_t n1, const QuantizedRow* x, int64_t rows, float* y,
                   int64_t ldy);
  // out[(n − n0) * ldo + k] = (c[n, k] − zero) · s[n, g(k)] for k < k_pad: the reference float32 weights.
  void (*decode_rows)(const Weights& w, int64_t n0, int64_t n1, float* out, int64_t ldo);
  // y[m * ldy + n] = Σ_{k < Kp} Ŵ[n, k] · x[m][k] with the decoded weights above; the activation rows come padded
  // to Kp with zeros and interleaved per block of 32: x[m * ldx + 32b + 8t + l] holds x[m][32b + 4l + t] (t < 4,
  // l < 8), the order in which the SIMD kernels find the codes in 32-bit lanes (see interleave_block).
  void (*dot_float)(const Weights& w, int64_t n0, int64_t n1, const float* x, int64_t ldx, int64_t rows, float* y,
                    int64_t ldy);
  // The randomized Hadamard transform of one row (Rotation), in two steps so that rows of a large factor can be
  // split over threads: fwht writes w = H_p (signs ⊙ x) (forward) or H_p x (transpose) per row of p values; with
  // k = 1 it finishes the transform itself (scale, and signs when transposed): w is then y (w may be x). mix writes
  // rows [a0, a1) of the k × p output: y[a] = c · Σ_b F(a, b) · w[b] (· signs when transposed), F(a, b) as
  // Rotation::f gives it.
  void (*fwht)(const Rotation& r, const float* x, float* w);
  void (*mix)(const Rotation& r, const float* w, int64_t a0, int64_t a1, float* y);
};

Kernels scalar_kernels();
// The instruction set the ops run ($LOWBIT_NATIVE_ISA when set, else the best the CPU has): 0 scalar, 1 AVX2, 2 AVX-512.
int64_t resolved_isa();
#if defined(__x86_64__)
Kernels avx2_kernels();
Kernels avx512_kernels(bool vnni);
#endif

// Position inside a block of 32 of the interleaved activation that multiplies code j (Kernels::dot_float).
inline int interleave_block(int j) { return 8 * (j & 3) + (j >> 2); }

// The group of block b (see Weights).
inline int64_t group_of_block(const Weights& w, int64_t b) {
  int64_t g = b / w.blocks_per_group;
  return g < w.groups ? g : w.groups - 1;
}

// Code p (0..127) of one packed unit (the layout above): the scalar decoder, used by unpack and the scalar kernels.
inline uint8_t unit_code(const uint8_t* unit, int bits, int p) {
  const int i = p >> 5, j = p & 31;
  if (bits == 2) return (unit[j] >> (2 * i)) & 3;
  if (bits == 3) {
    const uint8_t lo = (unit[j] >> (2 * i)) & 3;
    const uint8_t hi = (unit[32 + (j & 15)] >> (2 * i + (j >> 4))) & 1;
    return static_cast<uint8_t>(lo | hi << 2);
  }
  return (unit[32 * (i >> 1) + j] >> (4 * (i & 1))) & 15;  // bits == 4
}

}  // namespace lowbit_native
