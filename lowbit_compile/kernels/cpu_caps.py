"""What this CPU has, and which CPU kernel the integer linears take here, with the reason (shown in the report).

Measured (docs/benchmarks.md): on a CPU without AVX-512-BF16 (most laptops and many cloud instances, "AVX2") a
bfloat16 GEMM is emulated and 26x slower than float32, and the aten int4 kernel (`int4pack`, bfloat16 activations)
is 0.47x float32 at one row; the native kernels (`kernels/native`: 2/3/4-bit codes read as stored, int8
activations, float32 GEMM for prefill) are 0.09-0.23x at one row and ~0.97x at 512. With AVX-512-BF16 or AMX the
int4 kernel's bfloat16 prefill GEMM (0.59x float32) beats a float32 one, so there the int4pack path stays.

    choose(bits, group_size, device) -> Choice(kernel, reason)

- "native" where the native library is built and the CPU has no fast bfloat16;
- "int4pack" where bfloat16 is fast (its prefill runs in bfloat16), or the native library is not available (its
  prefill then decodes into float32: `prefill_dtype`);
- "reference" for what neither takes (8 bits, group sizes that are not multiples of 32, non-CPU weights).

A CPU with AVX-512 but without AVX-512-BF16 is the case a rule cannot decide (oneDNN's bfloat16 there is neither
native nor as slow as on AVX2): `fast_bf16` times one bfloat16 and one float32 GEMM once per process and keeps the
faster. LOWBIT_CPU_KERNEL=native|int4pack|reference forces a choice where it applies (benchmarks, bisecting).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch

from . import int4pack_layout

KERNEL_ENV = "LOWBIT_CPU_KERNEL"
KERNELS = ("native", "int4pack", "reference")


@dataclass(frozen=True)
class Choice:
    kernel: str  # one of KERNELS
    reason: str


@functools.cache
def features() -> dict:
    """The CPU features that decide the kernel (torch's own probes: no native build needed)."""
    cpu = torch.cpu
    capability = torch.backends.cpu.get_cpu_capability()
    wide = capability.startswith("AVX512")  # ATEN_CPU_CAPABILITY=avx2 (an emulated smaller CPU) caps what we use
    return {"capability": capability, "avx2": cpu._is_avx2_supported(), "avx512": wide and cpu._is_avx512_supported(),
            "avx512_bf16": wide and cpu._is_avx512_bf16_supported(), "amx": wide and cpu._is_amx_tile_supported(),
            "vnni": cpu._is_vnni_supported()}


def _time(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache
def fast_bf16() -> tuple[bool, str]:
    """(whether bfloat16 GEMMs are at least as fast as float32 here, why)."""
    f = features()
    if f["amx"] or f["avx512_bf16"]:
        return True, "AMX" if f["amx"] else "AVX-512-BF16"
    if not f["avx512"]:
        return False, f"{f['capability']} without AVX-512-BF16: bfloat16 GEMMs are emulated"
    a, b = torch.randn(256, 1024), torch.randn(1024, 1024)
    t32 = _time(lambda: a @ b)
    a16, b16 = a.bfloat16(), b.bfloat16()
    t16 = _time(lambda: a16 @ b16)
    fast = t16 <= t32
    return fast, f"AVX-512 without BF16, measured: a bfloat16 GEMM takes {t16 / t32:.2f}x float32"


def prefill_dtype() -> torch.dtype:
    """The dtype the int4pack paths decode weights into for prefill GEMMs."""
    return torch.bfloat16 if fast_bf16()[0] else torch.float32


def choose(bits: int, group_size: int, device: torch.device | str = "cpu") -> Choice:
    """The CPU kernel for an integer layer (see the module docstring)."""
    from . import native

    if torch.device(device).type != "cpu":
        return Choice("reference", f"weights on {torch.device(device).type}")
    if bits not in (2, 3, 4):
        return Choice("reference", f"int{bits} has no CPU fast path")
    if group_size and group_size % 32:
        return Choice("reference", f"group size {group_size} is not a multiple of 32")
    forced = os.environ.get(KERNEL_ENV, "")
    if forced:
        if forced not in KERNELS:
            from ..errors import LowbitError

            raise LowbitError(f"{KERNEL_ENV}={forced!r}: valid values are {KERNELS}")
        if forced != "native" or native.available():
            return Choice(forced, f"{KERNEL_ENV}={forced}")
    bf16, why = fast_bf16()
    if bf16 and _int4pack_layout_known():
        return Choice("int4pack", f"{why}: bfloat16 prefill GEMMs")
    if native.available():
        return Choice("native", f"{why}: native {bits}-bit kernel, float32 prefill")
    if not _int4pack_layout_known():
        return Choice("reference", f"native kernels unavailable ({native.unavailable_reason()[:200]}) and this CPU's "
                                   f"int4pack weight layout is not one we can decode")
    return Choice("int4pack", f"{why}, native kernels unavailable ({native.unavailable_reason()[:200]}): "
                              f"int4pack with float32 prefill")


def _int4pack_layout_known() -> bool:
    return int4pack_layout.packed_block_n() is not None


def choose_for(rec, kernels: str = "auto") -> Choice:
    """The kernel of a record: integer records by `choose` (kernels="auto"), E8 records by `choose_e8`, everything
    else and kernels="reference" on the reference ops (FP4 records find their CPU kernel later, in
    passes/fp4_fast_path)."""
    if kernels == "reference":
        return Choice("reference", "kernels='reference'")
    kind = getattr(rec, "kind", None)
    if kind == "e8":
        return choose_e8(rec.bits, rec.qweight.device)
    if kind != "int":
        return Choice("reference", "FP4: see fp4_fast_path")
    return choose(rec.bits, rec.group_size, rec.qweight.device)


def choose_e8(bits: int, device: torch.device | str = "cpu") -> Choice:
    """E8 records: "native" (their codes as 4-bit digits, e8p.int4_digits, on the native 4-bit kernel: E8P at the
    speed of int4, the 3/4-bit residual formats as two 4-bit passes in one call) wherever the native library is
    built, whatever bfloat16 does (the int4pack path does not take E8 digits); else "reference"
    (`lowbit::e8p_linear`, which decodes the weight on every call)."""
    from . import native

    if torch.device(device).type != "cpu":
        return Choice("reference", f"weights on {torch.device(device).type}")
    forced = os.environ.get(KERNEL_ENV, "")
    if forced == "reference":
        return Choice("reference", f"{KERNEL_ENV}={forced}")
    if not native.available():
        return Choice("reference", f"native kernels unavailable ({native.unavailable_reason()[:200]}): E8 codes "
                                   f"decoded on every call")
    how = "one 4-bit pass" if bits == 2 else "two 4-bit passes"
    return Choice("native", f"E8 codes as 4-bit digits on the native kernel ({how})")
