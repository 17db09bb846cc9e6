// The lowbit_native torch ops: argument checks, packing, int8 activation quantization, the choice of kernel
// (instruction set, decode vs GEMM) and the threading. The kernels themselves are in kernels_*.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "lowbit_native.h"

namespace lowbit_native {
namespace {

// ------------------------------------------------------------------------------------------ instruction sets

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512"};

struct CpuFeatures {
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false,
       avx512_vnni = false, avx512_bf16 = false, amx_tile = false, amx_int8 = false, amx_bf16 = false;
};

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__)
  __builtin_cpu_init();  // __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512_vnni = f.avx512f && __builtin_cpu_supports("avx512vnni");
  unsigned a, b, c, d;  // reported only, not used by any kernel: straight from CPUID leaf 7
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.amx_bf16 = (d >> 22) & 1;
    f.amx_tile = (d >> 24) & 1;
    f.amx_int8 = (d >> 25) & 1;
  }
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = f.avx512f && ((a >> 5) & 1);
#endif
  return f;
}

const CpuFeatures& features() {
  static const CpuFeatures f = detect();
  return f;
}

bool supported(Isa isa) {
  const CpuFeatures& f = features();
  switch (isa) {
    case kScalar: return true;
    case kAvx2: return f.avx2 && f.fma;
    case kAvx512: return f.avx2 && f.fma && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
  }
  return false;
}

Isa best_isa() { return supported(kAvx512) ? kAvx512 : supported(kAvx2) ? kAvx2 : kScalar; }

std::string supported_names() {
  std::string out;
  for (int64_t i = kScalar; i <= kAvx512; ++i)
    if (supported(static_cast<Isa>(i))) out += std::string(out.empty() ? "" : ", ") + kIsaNames[i];
  return out;
}

// "auto": $LOWBIT_NATIVE_ISA when set (and not "auto"), else the best the CPU has.
Isa resolve(c10::string_view requested) {
  std::string name(requested.data(), requested.size());
  std::string origin = "isa='" + name + "'";
  if (name == "auto") {
    const char* env = std::getenv("LOWBIT_NATIVE_ISA");
    if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best_isa();
    name = env;
    origin = "LOWBIT_NATIVE_ISA=" + name;
  }
  for (int64_t i = kScalar; i <= kAvx512; ++i) {
    if (name == kIsaNames[i]) {
      TORCH_CHECK(supported(static_cast<Isa>(i)), "lowbit_native: ", origin, ": this CPU runs only ",
                  supported_names());
      return static_cast<Isa>(i);
    }
  }
  TORCH_CHECK(false, "lowbit_native: ", origin, " is not an instruction set; valid: auto, scalar, avx2, avx512");
}

Kernels kernels_for(Isa isa) {
#if defined(__x86_64__)
  if (isa == kAvx512) return avx512_kernels(features().avx512_vnni);
  if (isa == kAvx2) return avx2_kernels();
#endif
  (void)isa;
  return scalar_kernels();
}

std::vector<int64_t> cpu_features() {
  const CpuFeatures& f = features();
  return {f.avx2, f.fma, f.avx512f, f.avx512bw, f.avx512vl, f.avx512dq, f.avx512_vnni, f.avx512_bf16,
          f.amx_tile, f.amx_int8, f.amx_bf16, best_isa()};
}

int64_t resolve_isa(c10::string_view isa) { return resolve(isa); }

// ----------------------------------------------------------------------------------------------- packing

void check_bits(int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "lowbit_native: bits=", bits, "; supported widths: 2, 3, 4");
}

// 128 codes (zero-padded) -> one unit of unit_bytes(bits) bytes (layout: lowbit_native.h).
void pack_unit(const uint8_t* c, int bits, uint8_t* out) {
  std::memset(out, 0, unit_bytes(bits));
  for (int p = 0; p < kUnit; ++p) {
    const int i = p >> 5, j = p & 31;
    if (bits == 4) {
      out[32 * (i >> 1) + j] |= static_cast<uint8_t>(c[p] << (4 * (i & 1)));
    } else {
      out[j] |= static_cast<uint8_t>((c[p] & 3) << (2 * i));
      if (bits == 3) out[32 + (j & 15)] |= static_cast<uint8_t>((c[p] >> 2) << (2 * i + (j >> 4)));
    }
  }
}

at::Tensor pack(const at::Tensor& codes_in, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.scalar_type() == at::kByte,
              "lowbit_native.pack: codes must be a 2-D uint8 tensor (N, K), got ", codes_in.scalar_type(), " ",
              codes_in.sizes());
  const at::Tensor codes = codes_in.contiguous();
  const int64_t n = codes.size(0), k = codes.size(1);
  if (codes.numel()) {
    const int64_t top = codes.max().item<uint8_t>();
    TORCH_CHECK(top < (int64_t{1} << bits), "lowbit_native.pack: a code is ", top, "; ", bits,
                "-bit codes lie in [0, ", int64_t{1} << bits, ")");
  }
  at::Tensor out = at::empty({n, row_bytes(bits, k)}, codes.options());
  const uint8_t* src = codes.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t units = padded_k(k) / kUnit, stride = out.size(1);
  at::parallel_for(0, n, 64, [&](int64_t n0, int64_t n1) {
    uint8_t c[kUnit];
    for (int64_t r = n0; r < n1; ++r) {
      for (int64_t u = 0; u < units; ++u) {
        const int64_t k0 = u * kUnit, len = std::min(kUnit, k - k0);
        std::memset(c, 0, sizeof(c));  // padding: code 0 (it meets activations padded with 0)
        std::memcpy(c, src + r * k + k0, len);
        pack_unit(c, static_cast<int>(bits), dst + r * stride + u * unit_bytes(bits));
      }
    }
  });
  return out;
}

void check_packed(const at::Tensor& packed, int64_t bits, int64_t n, int64_t k, const char* op) {
  TORCH_CHECK(n >= 0 && k >= 1, "lowbit_native.", op, ": N=", n, ", K=", k, "; need N >= 0 and K >= 1");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(0) == n &&
                  packed.size(1) == row_bytes(bits, k),
              "lowbit_native.", op, ": packed must be uint8 (", n, ", ", row_bytes(bits, k), ") for N=", n, ", K=",
              k, ", bits=", bits, " (lowbit_native.pack's layout); got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(packed.device().is_cpu(), "lowbit_native.", op, ": tensors must be on the CPU");
}

at::Tensor unpack(const at::Tensor& packed_in, int64_t bits, int64_t n, int64_t k) {
  check_bits(bits);
  check_packed(packed_in, bits, n, k, "unpack");
  const at::Tensor packed = packed_in.contiguous();
  at::Tensor out = at::empty({n, k}, packed.options());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t stride = packed.size(1);
  at::parallel_for(0, n, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t r = n0; r < n1; ++r)
      for (int64_t kk = 0; kk < k; ++kk)
        dst[r * k + kk] = unit_code(src + r * stride + (kk / kUnit) * unit_bytes(bits), static_cast<int>(bits),
                                    static_cast<int>(kk % kUnit));
  });
  return out;
}

// ------------------------------------------------------------------------------------------ int8 activations

// One row x (K floats) -> q (k_pad int8, 0 beyond K), d (one scale per block of 32: max|x| / 127) and gsum (per
// weight group: Σ_b d[b]·Σq over its blocks, in block order). q = round-half-even(x · 127/max|x|) through the
// 1.5·2²³ trick, exact for |t| < 2²²; the library is built with -ffp-contract=off so every platform rounds alike.
void quantize_row(const float* x, int64_t k, const Weights& w, int8_t* q, float* d, float* gsum) {
  constexpr float kMagic = 12582912.f;  // 1.5 · 2^23
  std::fill(gsum, gsum + w.groups, 0.f);
  for (int64_t b = 0; b < w.k_pad / kBlock; ++b) {
    const int64_t k0 = b * kBlock, len = std::max<int64_t>(0, std::min(kBlock, k - k0));
    float amax = 0.f;
    for (int64_t j = 0; j < len; ++j) amax = std::max(amax, std::fabs(x[k0 + j]));
    const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t qsum = 0;
    for (int64_t j = 0; j < kBlock; ++j) {
      const float t = j < len ? x[k0 + j] * inv : 0.f;
      const int32_t v = static_cast<int32_t>((t + kMagic) - kMagic);
      q[k0 + j] = static_cast<int8_t>(v);
      qsum += v;
    }
    d[b] = scale;
    gsum[group_of_block(w, b)] += scale * static_cast<float>(qsum);
  }
}

// ------------------------------------------------------------------------------------------------- linear

// Weight rows decoded to float32 per GEMM call on the prefill path. sgemm packs the activations again on every
// call, so narrow tiles pay that M·K copy many times: at M = 512, one thread, 4096 x 11008 costs 1.18x float32
// F.linear with 80-row tiles (4 MB), 1.05x with 256, 1.03x with 512, 1.04x with 1024 and 1.21x with the whole
// weight at once (out of cache). The tile (8 MB at K = 4096, 22 MB at K = 11008) is allocated once per call.
constexpr int64_t kTileRows = 512;

// prefill_rows = -1: from how many rows on the decode + float32 GEMM path is faster, measured at one thread on an
// AVX2 CPU (Zen 3, 4096 x 4096): the float mode decodes every weight once per 4 activation rows and loses to the
// GEMM from about 8 rows; the int8 mode with 3 bits from about 32 rows (its high-bit plane costs a third more per
// block). With 2 and 4 bits the int8 kernel is an int8 GEMM still faster than float32 sgemm at 512 rows
// (0.83-0.90x), so 256 is a choice: prompts get float32 activations at about the float32 cost.
int64_t default_prefill_rows(bool int8_act, int64_t bits) {
  if (!int8_act) return 8;
  return bits == 3 ? 32 : 256;
}

int64_t prefill_rows_for(c10::string_view act, int64_t bits) { return default_prefill_rows(act == "int8", bits); }

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& scales_in, int64_t bits,
                  double zero, int64_t n, int64_t k, c10::string_view act, int64_t prefill_rows,
                  c10::string_view isa_name) {
  check_bits(bits);
  check_packed(packed_in, bits, n, k, "linear");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() >= 1 && x_in.size(-1) == k,
              "lowbit_native.linear: x must be float32 (..., K=", k, "), got ", x_in.scalar_type(), " ",
              x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "lowbit_native.linear: tensors must be on the CPU");
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.dim() == 2 && scales_in.size(0) == n &&
                  scales_in.size(1) >= 1,
              "lowbit_native.linear: scales must be float32 (N=", n, ", groups), got ", scales_in.scalar_type(), " ",
              scales_in.sizes());
  const int64_t groups = scales_in.size(1);
  TORCH_CHECK(groups == 1 || (k % groups == 0 && (k / groups) % kBlock == 0), "lowbit_native.linear: ", groups,
              " scale groups on K=", k, ": groups must split K into group sizes that are multiples of ", kBlock,
              " (or one scale per row)");
  const bool int8_act = act == "int8";
  TORCH_CHECK(int8_act || act == "float", "lowbit_native.linear: act='", std::string(act.data(), act.size()),
              "'; valid: 'int8', 'float'");
  const Kernels kern = kernels_for(resolve(isa_name));

  const at::Tensor x = x_in.contiguous(), packed = packed_in.contiguous(), scales = scales_in.contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  const int64_t m = x.numel() / k;
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y.view(out_shape);

  const int64_t k_pad = padded_k(k);
  const Weights w{packed.data_ptr<uint8_t>(), packed.size(1), scales.data_ptr<float>(), groups,
                  groups == 1 ? k_pad / kBlock : k / groups / kBlock, k_pad, static_cast<int>(bits),
                  static_cast<float>(zero)};
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();

  if (prefill_rows < 0) prefill_rows = default_prefill_rows(int8_act, bits);
  if (prefill_rows > 0 && m >= prefill_rows) {
    // Prefill: decode tiles of weight rows to float32 and let the float32 GEMM (x · tileᵀ) write y's columns.
    const int64_t tile_rows = std::min(n, kTileRows);
    at::Tensor tile = at::empty({tile_rows, k_pad}, x.options());
    float* tp = tile.data_ptr<float>();
    const at::Tensor x2 = x.view({m, k});
    for (int64_t n0 = 0; n0 < n; n0 += tile_rows) {
      const int64_t rows = std::min(tile_rows, n - n0);
      at::parallel_for(n0, n0 + rows, 8, [&](int64_t a, int64_t b) {
        kern.decode_rows(w, a, b, tp + (a - n0) * k_pad, k_pad);
      });
      at::Tensor out = y.narrow(1, n0, rows);
      at::mm_out(out, x2, tile.narrow(0, 0, rows).narrow(1, 0, k).t());
    }
    return y.view(out_shape);
  }

  if (int8_act) {
    const int64_t blocks = k_pad / kBlock;
    std::vector<int8_t> q(m * k_pad);
    std::vector<float> d(m * blocks), gsum(m * groups);
    std::vector<QuantizedRow> rows(m);
    at::parallel_for(0, m, 16, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        quantize_row(xp + i * k, k, w, q.data() + i * k_pad, d.data() + i * blocks, gsum.data() + i * groups);
        rows[i] = QuantizedRow{q.data() + i * k_pad, d.data() + i * blocks, gsum.data() + i * groups};
      }
    });
    at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) { kern.dot_int8(w, a, b, rows.data(), m, yp, n); });
  } else {
    std::vector<float> xi(m * k_pad, 0.f);  // x padded to Kp, interleaved per block (Kernels::dot_float)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t kk = 0; kk < k; ++kk)
        xi[i * k_pad + (kk & ~int64_t{31}) + interleave_block(static_cast<int>(kk & 31))] = xp[i * k + kk];
    xp = xi.data();
    const int64_t ldx = k_pad;
    at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) { kern.dot_float(w, a, b, xp, ldx, m, yp, n); });
  }
  return y.view(out_shape);
}

// ----------------------------------------------------------------------------------------------- rotation

// Output rows of the factor given to one thread at M = 1: a few hundred thousand multiply-adds, or the thread's
// start costs more than it saves.
constexpr int64_t kMixGrainMacs = 1 << 18;

at::Tensor hadamard(const at::Tensor& x_in, const c10::optional<at::Tensor>& signs_in,
                    const c10::optional<at::Tensor>& factor_in, bool transpose, c10::string_view isa_name) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() >= 1 && x_in.size(-1) >= 1 && x_in.device().is_cpu(),
              "lowbit_native.hadamard: x must be a float32 CPU tensor (..., n), got ", x_in.scalar_type(), " ",
              x_in.sizes(), " on ", x_in.device());
  const int64_t n = x_in.size(-1);
  at::Tensor factor;
  int64_t k = 1;
  if (factor_in.has_value()) {
    const at::Tensor& f = *factor_in;
    TORCH_CHECK(f.dim() == 2 && f.size(0) == f.size(1) && f.size(0) >= 1 &&
                    (f.scalar_type() == at::kFloat || f.scalar_type() == at::kChar) && f.device().is_cpu(),
                "lowbit_native.hadamard: factor must be a square float32 (orthonormal) or int8 (±1) CPU matrix, got ",
                f.scalar_type(), " ", f.sizes());
    k = f.size(0);
    factor = f.contiguous();
  }
  const int64_t p = n / k;
  TORCH_CHECK(n % k == 0 && (p & (p - 1)) == 0, "lowbit_native.hadamard: a factor of size ", k,
              " does not fit n=", n, ": n must be the factor's size times a power of two (hadamard.plan(n))");
  at::Tensor signs;
  if (signs_in.has_value()) {
    TORCH_CHECK(signs_in->scalar_type() == at::kFloat && signs_in->dim() == 1 && signs_in->size(0) == n &&
                    signs_in->device().is_cpu(),
                "lowbit_native.hadamard: signs must be float32 (n=", n, "), got ", signs_in->scalar_type(), " ",
                signs_in->sizes());
    signs = signs_in->contiguous();
  }
  const Kernels kern = kernels_for(resolve(isa_name));
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t m = x.numel() / n;
  if (m == 0) return y;
  const bool int8_factor = factor.defined() && factor.scalar_type() == at::kChar;  // ±1: the 1/√k joins the scale
  const Rotation rot{n, k, p, signs.defined() ? signs.data_ptr<float>() : nullptr,
                     factor.defined() && !int8_factor ? factor.data_ptr<float>() : nullptr,
                     int8_factor ? factor.data_ptr<int8_t>() : nullptr,
                     static_cast<float>(1.0 / std::sqrt(static_cast<double>(int8_factor ? n : p))), transpose};
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (k == 1) {
    at::parallel_for(0, m, std::max<int64_t>(1, (1 << 14) / n), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) kern.fwht(rot, xp + i * n, yp + i * n);
    });
    return y;
  }
  if (m == 1) {  // one row (decode): the factor's output rows are split over the threads
    std::unique_ptr<float[]> work(new float[n]);
    kern.fwht(rot, xp, work.get());
    const int64_t blocks = (k + 3) / 4, grain = std::max<int64_t>(1, kMixGrainMacs / (4 * k * p));
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {  // whole blocks of the kernel's 4 rows
      kern.mix(rot, work.get(), 4 * b0, std::min(k, 4 * b1), yp);
    });
    return y;
  }
  at::parallel_for(0, m, 1, [&](int64_t r0, int64_t r1) {
    std::unique_ptr<float[]> work(new float[n]);
    for (int64_t i = r0; i < r1; ++i) {
      kern.fwht(rot, xp + i * n, work.get());
      kern.mix(rot, work.get(), 0, k, yp + i * n);
    }
  });
  return y;
}

// The float32 weight (N, K) the kernel applies: codes decoded with their scales (the prefill path's tiles, whole).
at::Tensor decode_weight(const at::Tensor& packed_in, const at::Tensor& scales_in, int64_t bits, double zero,
                         int64_t n, int64_t k, c10::string_view isa_name) {
  const at::Tensor packed = packed_in.contiguous(), scales = scales_in.contiguous();
  const int64_t groups = scales.size(1), k_pad = padded_k(k);
  const Weights w{packed.data_ptr<uint8_t>(), packed.size(1), scales.data_ptr<float>(), groups,
                  groups == 1 ? k_pad / kBlock : k / groups / kBlock, k_pad, static_cast<int>(bits),
                  static_cast<float>(zero)};
  const Kernels kern = kernels_for(resolve(isa_name));
  at::Tensor out = at::empty({n, k_pad}, scales.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 8, [&](int64_t a, int64_t b) { kern.decode_rows(w, a, b, op + a * k_pad, k_pad); });
  return out.narrow(1, 0, k);
}

// y = sv ⊙ T_Nᵀ(linear(T_K(su ⊙ x))) + bias: the whole rotated linear in one call (no rotation on a side whose
// signs are None). At one row the per-call cost of the three ops (Python, dispatcher, an output each) is as large
// as the rotations themselves.
//
// Many rows (a prompt, a batch of sentences): rotating M·(K + N) activations costs more than rotating the N·K
// weight once per call when M·(K + N) > 2·N·K, so there the weight is decoded and rotated instead,
// W' = D_sv T_Nᵀ Ŵ T_K D_su, and y = x · W'ᵀ is one float32 GEMM: float32's speed plus a decode and two
// transforms of the weight (all-MiniLM-L6-v2, 2048 rows × 384: 5x fewer transform flops than the activations).
at::Tensor rotated_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t bits,
                          double zero, int64_t n, int64_t k, const c10::optional<at::Tensor>& su,
                          const c10::optional<at::Tensor>& factor_in, const c10::optional<at::Tensor>& sv,
                          const c10::optional<at::Tensor>& factor_out, const c10::optional<at::Tensor>& bias,
                          c10::string_view act, int64_t prefill_rows, c10::string_view isa) {
  TORCH_CHECK(su.has_value() || !factor_in.has_value(), "lowbit_native.rotated_linear: factor_in without su");
  TORCH_CHECK(sv.has_value() || !factor_out.has_value(), "lowbit_native.rotated_linear: factor_out without sv");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == n),
              "lowbit_native.rotated_linear: bias must be float32 (N=", n, ")");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) == k,
              "lowbit_native.rotated_linear: x must be float32 (..., K=", k, "), got ", x.scalar_type(), " ",
              x.sizes());
  const int64_t m = x.numel() / k;
  const int64_t from = prefill_rows < 0 ? default_prefill_rows(act == "int8", bits) : prefill_rows;
  if ((su.has_value() || sv.has_value()) && from > 0 && m >= from && m * (n + k) > 2 * n * k) {
    check_bits(bits);
    check_packed(packed, bits, n, k, "rotated_linear");
    TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.size(0) == n,
                "lowbit_native.rotated_linear: scales must be float32 (N=", n, ", groups), got ",
                scales.scalar_type(), " ", scales.sizes());
    at::Tensor w = decode_weight(packed, scales, bits, zero, n, k, isa);  // (N, K)
    if (su.has_value()) w = hadamard(w, su, factor_in, true, isa);     // rows: su ⊙ T_Kᵀ(row) = (Ŵ T_K D_su)[r]
    at::Tensor wt = w.t().contiguous();                                 // (K, N)
    if (sv.has_value()) wt = hadamard(wt, sv, factor_out, true, isa);   // rows: sv ⊙ T_Nᵀ(column) = W'ᵀ
    std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
    out_shape.back() = n;
    at::Tensor y = bias.has_value() ? at::addmm(*bias, x.reshape({m, k}), wt) : at::mm(x.reshape({m, k}), wt);
    return y.view(out_shape);
  }
  const at::Tensor h = su.has_value() ? hadamard(x, su, factor_in, false, isa) : x;
  at::Tensor y = linear(h, packed, scales, bits, zero, n, k, act, prefill_rows, isa);
  if (sv.has_value()) y = hadamard(y, sv, factor_out, true, isa);
  if (bias.has_value()) y.add_(*bias);
  return y;
}

}  // namespace

int64_t resolved_isa() { return resolve("auto"); }

TORCH_LIBRARY(lowbit_native, m) {
  m.def("pack(Tensor codes, int bits) -> Tensor");
  m.def("unpack(Tensor packed, int bits, int N, int K) -> Tensor");
  m.def(
      "linear(Tensor x, Tensor packed, Tensor scales, int bits, float zero, int N, int K, str act=\"int8\", "
      "int prefill_rows=-1, str isa=\"auto\") -> Tensor");
  m.def("hadamard(Tensor x, Tensor? signs, Tensor? factor, bool transpose=False, str isa=\"auto\") -> Tensor");
  m.def(
      "rotated_linear(Tensor x, Tensor packed, Tensor scales, int bits, float zero, int N, int K, Tensor? su=None, "
      "Tensor? factor_in=None, Tensor? sv=None, Tensor? factor_out=None, Tensor? bias=None, str act=\"int8\", "
      "int prefill_rows=-1, str isa=\"auto\") -> Tensor");
  m.def("cpu_features() -> int[]", &cpu_features);
  m.def("resolve_isa(str isa=\"auto\") -> int", &resolve_isa);
  m.def("default_prefill_rows(str act, int bits) -> int", &prefill_rows_for);
}

TORCH_LIBRARY_IMPL(lowbit_native, CPU, m) {
  m.impl("pack", &pack);
  m.impl("unpack", &unpack);
  m.impl("linear", &linear);
  m.impl("hadamard", &hadamard);
  m.impl("rotated_linear", &rotated_linear);
}

}  // namespace lowbit_native
