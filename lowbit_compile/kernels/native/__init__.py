"""Native CPU kernels for 2/3/4-bit weights: the `lowbit_native::*` torch ops, a C++ extension built on first use.

The ops (schemas in csrc/ops.cpp, CPU kernels in csrc/kernels_*.cpp, fakes below for torch.compile/export):

- `pack(codes uint8 (N, K), bits) -> uint8 (N, Kp·bits/8)`: codes in [0, 2^bits) into the kernels' layout
  (csrc/lowbit_native.h): K is padded with code 0 to Kp, a multiple of 128; units of 128 codes in 16·bits bytes,
  2-bit as four 2-bit fields per byte (block i of 32 codes = (byte >> 2i) & 3), 3-bit as that plane plus a 1-bit
  plane, 4-bit as nibbles. `unpack(packed, bits, N, K)` is its exact inverse.
- `linear(x float32 (..., K), packed, scales float32 (N, G), bits, zero, N, K, act="int8", prefill_rows=-1,
  isa="auto") -> float32 (..., N)`: y = x · Ŵᵀ with Ŵ[n, k] = (code[n, k] − zero) · scales[n, k // (K / G)];
  G = 1 is one scale per row, otherwise K / G must be a multiple of 32. zero is the grid's: (2^b − 1)/2 for the
  2/3-bit midrise grids, 8 for signed int4 (formats.int_format(bits).zero); any float works.
  act="int8": x is quantized per block of 32 inputs (symmetric, d = max|x|/127, q = round(x/d)), code × q
  products summed in int32 (AVX2 vpmaddubsw + vpmaddwd, or AVX512-VNNI vpdpbusd), then scaled in float32; the
  zero enters as −zero · Σ x̂ with x̂ = d·q the dequantized activations, so the result is Ŵ · x̂ up to float32
  rounding: the error against Ŵ · x is Σ_k Ŵ[n, k] (x̂_k − x_k), at most Σ_k |Ŵ[n, k]| · d(k)/2.
  act="float": each weight row is decoded to float32 exactly as the reference dequantize does, then multiplied
  with x in float32 (error: float32 accumulation only).
  M = x.numel() / K rows at or above prefill_rows (0: never) take the prefill path whatever act says: tiles of
  512 weight rows are decoded to float32 and multiplied by the float32 GEMM (at::mm), float32 throughout.
  prefill_rows=-1 (default_prefill_rows) was measured on an AVX2 CPU at one thread: act="float" from 8 rows,
  act="int8" from 32 rows for 3 bits (the crossovers) and from 256 for 2 and 4 bits, a choice: that int8 kernel is
  an int8 GEMM still faster than float32 sgemm at 512 rows (0.83-0.90x), but prompts keep float32 activations
  at about the float32 cost; prefill_rows=0 keeps the int8 kernel.
  isa picks the code path: "auto" ($LOWBIT_NATIVE_ISA when set, else the best this CPU has), "scalar", "avx2",
  "avx512"; asking for one the CPU lacks is an error.
- `hadamard(x float32 (..., n), signs float32 (n) or None, factor or None, transpose=False, isa="auto") -> float32
  (..., n)`: the randomized Hadamard transform of hadamard.py on the last dimension, n = K·P with P a power of two
  and T = F_K ⊗ H_P/√P: y = T(signs ⊙ x), or with transpose y = signs ⊙ Tᵀx (hadamard.apply's inverse). factor is
  F_K, float32 (orthonormal, as hadamard.factor(n) gives it), or int8 holding the ±1 entries of a Hadamard matrix
  of order K (F_K = factor/√K, as cpu.rotation_blocks keeps factors above 128); None for K = 1. H_P runs as the
  fast Walsh–Hadamard transform (P·log₂P additions, in registers for the first three stages), F_K as a small dense
  product; the result equals hadamard.apply's to float32 rounding (bound: tests/kernels/test_native.py).
- `rotated_linear(x, packed, scales, bits, zero, N, K, su=None, factor_in=None, sv=None, factor_out=None, bias=None,
  act="int8", prefill_rows=-1, isa="auto") -> float32 (..., N)`: one call for a whole rotated layer,
  y = hadamard(linear(hadamard(x, su, factor_in)), sv, factor_out, transpose=True) + bias, bit for bit; a side
  whose signs are None is not rotated. At one row the three separate calls cost as much again as the rotations.
- `ldlq(wt, ut, d, st, per_group, zero, max_code, block) -> (codes, loss)`: the column loop of
  quantize/ldlq.ldlq_factored (csrc/ldlq.cpp), bit for bit the Python loop's result without its ~80 µs of
  interpreter overhead per column; the quantizer uses it when the library is available.
- `fp4_round(x float32 (R, C), scale float32 (R or 1 elements), m_bits, max_value, minus_input) -> float32 (R, C)`:
  formats.fp4.quantize(x, fmt, scale) (minus x with minus_input) in one pass (csrc/fp4_round.cpp), bit for bit torch's
  ten elementwise passes; the FP4 search's candidates use it (quantize.fp4.round_fp4) when the library is available.
- `fp4_ints(x, scale, m_bits, max_value, mult) -> int8 (R, C)`: the same rounding, as the signed bias-0 value times mult
  (quantize.fp4.int_mult: an exact small integer), and `fp4_sq_err(m int32 (R, T), c float32 (R or 1), y float32 (R, T))
  -> float64 (R)`: Σ_t (float32(m)·c − y)² per row, summed in double in a fixed order. With torch's int8 GEMM between
  them they are the FP4 search's exact candidate errors (quantize.fp4.fp4_ints, sq_err_rows). Their loops
  (csrc/fp4_rows.inc, with fp4_round's) are compiled for baseline x86-64, AVX2 and AVX-512 and run the ISA `isa="auto"`
  resolves; every build gives the same bits.
- `cpu_features() -> int[]`, `resolve_isa(isa) -> int`: what `capabilities()` reads;
  `default_prefill_rows(act, bits) -> int`: the rows from which prefill_rows=-1 takes the GEMM path.

Rows of the output are split over torch's intra-op threads (at::parallel_for); the prefill GEMM is torch's. A
single row of `hadamard` with a large factor splits the factor's output rows instead.

Build: `torch.utils.cpp_extension.load` (needs a C++ compiler torch's headers accept,
g++ or clang, and the `ninja` package) into a directory named by
a hash of the sources, flags, torch and Python versions, under $LOWBIT_NATIVE_BUILD_DIR or
~/.cache/lowbit_compile/native; a file lock (fcntl, released if a builder dies) lets parallel processes (pytest
workers) wait for one build. Later processes load the built library directly, without ninja or a compiler.
Nothing is built at import: the first `available()`, `load()` or op wrapper call builds or loads.
`python -m lowbit_compile.kernels.native` builds and prints what it found.

No -march flag: the library runs on any x86-64 (or other) CPU. The AVX2 and AVX-512 kernels carry their
instruction set as a function attribute and run only where the CPU has it; on other architectures only the
scalar kernels are compiled.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sys
import traceback

import torch

NAMESPACE = "lowbit_native"
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = ("ops.cpp", "kernels_scalar.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp", "ldlq.cpp", "fp4_round.cpp")
HEADERS = ("lowbit_native.h", "kernels_simd.inc", "hadamard_simd.inc", "fp4_rows.inc")
CFLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-Wall")
ISAS = ("scalar", "avx2", "avx512")
FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "amx_tile",
            "amx_int8", "amx_bf16")
PREFILL_ROWS = -1  # linear's default: the measured crossover to the decode + float32 GEMM path (csrc/ops.cpp)


def build_key() -> str:
    """Hash of everything the binary depends on: sources, flags, torch, Python, machine."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        with open(os.path.join(CSRC, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    h.update(repr((CFLAGS, torch.__version__, sys.version_info[:2], platform.machine())).encode())
    return h.hexdigest()[:16]


def build_dir() -> str:
    root = os.environ.get("LOWBIT_NATIVE_BUILD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lowbit_compile",
        "native")
    return os.path.join(root, f"{NAMESPACE}_{build_key()}")


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive lock held while this process builds or loads; the kernel frees it if the process dies (torch's
    own lock file would stay behind and block later builds)."""
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_and_load(verbose: bool = False) -> str:
    """Build (if needed) and load the library; returns its path. Raises on failure."""
    from torch.utils import cpp_extension

    directory = build_dir()
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(directory)
    library = os.path.join(directory, f"{name}.so")
    done = os.path.join(directory, "complete")
    with _file_lock(os.path.join(directory, "build.lock")):
        if not os.path.exists(done):
            stale = os.path.join(directory, "lock")  # torch's baton, left by a builder that died: we hold the lock
            if os.path.exists(stale):
                os.remove(stale)
            cpp_extension.load(name, [os.path.join(CSRC, s) for s in SOURCES], extra_cflags=list(CFLAGS),
                               build_directory=directory, is_python_module=False, verbose=verbose)
            with open(done, "w") as f:
                f.write(library + "\n")
        else:
            torch.ops.load_library(library)
    _register_fakes()
    return library


@functools.cache
def _state() -> tuple[str | None, str]:
    """(library path or None, why not)."""
    try:
        return _build_and_load(), ""
    except Exception as e:  # no compiler, no ninja, a compile error, an unwritable cache: the package still imports
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        return None, f"the lowbit_native C++ extension could not be built or loaded ({detail[-2000:]})"


def load() -> None:
    """Build or load the extension; raises RuntimeError with the reason when that is not possible."""
    path, reason = _state()
    if path is None:
        raise RuntimeError(reason)


def available() -> bool:
    return _state()[0] is not None


def unavailable_reason() -> str:
    """Why `available()` is False ("" when it is True)."""
    return _state()[1]


def capabilities() -> dict:
    """What this CPU has (FEATURES), the instruction sets the kernels can use here, and the one isa="auto" runs
    (after $LOWBIT_NATIVE_ISA)."""
    load()
    ops = getattr(torch.ops, NAMESPACE)
    flags = ops.cpu_features()
    out = {name: bool(v) for name, v in zip(FEATURES, flags)}
    best = ISAS[flags[len(FEATURES)]]
    out["isas"] = [isa for isa in ISAS if ISAS.index(isa) <= ISAS.index(best)]
    out["best"] = best
    out["selected"] = ISAS[ops.resolve_isa("auto")]
    out["int8_dot"] = ("vpdpbusd (AVX512-VNNI)" if out["selected"] == "avx512" and out["avx512_vnni"] else
                       "vpmaddubsw + vpmaddwd" if out["selected"] != "scalar" else "scalar")
    return out


def default_prefill_rows(act: str, bits: int) -> int:
    """From how many rows on `linear` with prefill_rows=-1 decodes to float32 and runs the GEMM."""
    load()
    return torch.ops.lowbit_native.default_prefill_rows(act, bits)


def supported_isas() -> list[str]:
    return capabilities()["isas"]


# ----------------------------------------------------------------------------------------------- fakes


def _padded_k(k):
    return (k + 127) // 128 * 128


_FAKES_REGISTERED = False


def _register_fakes() -> None:
    """Fakes (meta kernels) for torch.compile / export: fresh tensors of the right shape, after the same checks
    the C++ side makes on shapes."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return
    _FAKES_REGISTERED = True

    @torch.library.register_fake(f"{NAMESPACE}::pack")
    def _pack_fake(codes, bits):
        torch._check(codes.dim() == 2 and codes.dtype == torch.uint8, lambda: "pack: codes must be uint8 (N, K)")
        return codes.new_empty((codes.shape[0], _padded_k(codes.shape[1]) // 8 * bits))

    @torch.library.register_fake(f"{NAMESPACE}::unpack")
    def _unpack_fake(packed, bits, N, K):
        torch._check(packed.shape[1] == _padded_k(K) // 8 * bits,
                     lambda: f"unpack: packed has {packed.shape[1]} bytes per row, K={K} at {bits} bits needs "
                             f"{_padded_k(K) // 8 * bits}")
        return packed.new_empty((N, K))

    @torch.library.register_fake(f"{NAMESPACE}::linear")
    def _linear_fake(x, packed, scales, bits, zero, N, K, act="int8", prefill_rows=PREFILL_ROWS, isa="auto"):
        torch._check(x.shape[-1] == K, lambda: f"linear: x has {x.shape[-1]} features, the weight expects {K}")
        torch._check(x.dtype == torch.float32, lambda: f"linear: x must be float32, got {x.dtype}")
        return x.new_empty((*x.shape[:-1], N))

    @torch.library.register_fake(f"{NAMESPACE}::hadamard")
    def _hadamard_fake(x, signs, factor, transpose=False, isa="auto"):
        torch._check(x.dtype == torch.float32, lambda: f"hadamard: x must be float32, got {x.dtype}")
        n = x.shape[-1]
        if signs is not None:
            torch._check(signs.shape == (n,), lambda: f"hadamard: signs {tuple(signs.shape)} for n={n}")
        if factor is not None:
            k = factor.shape[0]
            torch._check(factor.shape == (k, k) and n % k == 0,
                         lambda: f"hadamard: factor {tuple(factor.shape)} does not fit n={n}")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{NAMESPACE}::rotated_linear")
    def _rotated_linear_fake(x, packed, scales, bits, zero, N, K, su=None, factor_in=None, sv=None, factor_out=None,
                             bias=None, act="int8", prefill_rows=PREFILL_ROWS, isa="auto"):
        torch._check(x.shape[-1] == K, lambda: f"rotated_linear: x has {x.shape[-1]} features, the weight expects {K}")
        torch._check(x.dtype == torch.float32, lambda: f"rotated_linear: x must be float32, got {x.dtype}")
        return x.new_empty((*x.shape[:-1], N))


# ------------------------------------------------------------------------------------------ Python wrappers


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    load()
    return torch.ops.lowbit_native.pack(codes, bits)


def unpack(packed: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    load()
    return torch.ops.lowbit_native.unpack(packed, bits, n, k)


def linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, zero: float, n: int, k: int,
           act: str = "int8", prefill_rows: int = PREFILL_ROWS, isa: str = "auto") -> torch.Tensor:
    load()
    return torch.ops.lowbit_native.linear(x, packed, scales, bits, zero, n, k, act, prefill_rows, isa)


def hadamard(x: torch.Tensor, signs: torch.Tensor | None, factor: torch.Tensor | None, transpose: bool = False,
             isa: str = "auto") -> torch.Tensor:
    load()
    return torch.ops.lowbit_native.hadamard(x, signs, factor, transpose, isa)


def rotated_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, zero: float, n: int, k: int,
                   su: torch.Tensor | None = None, factor_in: torch.Tensor | None = None,
                   sv: torch.Tensor | None = None, factor_out: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, act: str = "int8", prefill_rows: int = PREFILL_ROWS,
                   isa: str = "auto") -> torch.Tensor:
    load()
    return torch.ops.lowbit_native.rotated_linear(x, packed, scales, bits, zero, n, k, su, factor_in, sv, factor_out,
                                                  bias, act, prefill_rows, isa)
