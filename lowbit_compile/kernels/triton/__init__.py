"""Triton kernels for the `lowbit::` ops on CUDA: Hadamard, low-bit dequant-matmul, FP4 matmul.

This package imports without Triton and without a GPU: the kernels live in submodules that import `triton`
and are loaded on first use (`launchers()`). The ops in `kernels/ops.py` and `kernels/fp4_ops.py` ask
`usable(x)` and either launch these kernels (through `torch.library.wrap_triton`, so Inductor sees them) or
call the reference implementation.

- `hadamard.py`  fast Walsh–Hadamard transform with sign vectors (2^k up to 2^17 on the last dimension) and
                 the dense K×K factor of n = K·2^k as a second small GEMM kernel
- `decode.py`    in-register decoding: packed 2/3/4/8-bit codes, FP4 codes, FP4 activation rounding
- `matmul.py`    dequant-GEMV (decode, M ≤ 16) and dequant-GEMM (prefill, tl.dot) for integer and FP4 weights
- `launch.py`    the host side: shapes, block sizes and grids, shared by the ops and the tests
- `interpret.py` runs kernel checks on CPU under TRITON_INTERPRET=1 (tests, debugging without a GPU)
- `aot.py`       compiles recorded launches to sm_90 cubins without a GPU (what the interpreter cannot check)

Set LOWBIT_DISABLE_TRITON=1 to force the reference path on CUDA (debugging, benchmarks).
"""

from __future__ import annotations

import functools
import os

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def available() -> bool:
    """Triton imports (the GPU itself is the caller's concern: see `usable`)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def usable(x: torch.Tensor) -> bool:
    """Whether the Triton kernels take this input: a CUDA tensor of a kernel dtype, Triton installed."""
    return (x.device.type == "cuda" and x.dtype in KERNEL_DTYPES and available()
            and os.environ.get("LOWBIT_DISABLE_TRITON", "0") in ("", "0"))


def triton_op(name: str, mutates_args=()):
    """`torch.library.triton_op`, minus its eager scan of the body's source for Triton kernels.

    The scan imports torch._inductor and triton (+3 s on every `import lowbit_compile`) and cannot follow our
    lazy import of the kernels anyway: it records no kernels either way. The recorded list only feeds
    AOTAutogradCache keys, so after editing a kernel run with TORCHINDUCTOR_FORCE_DISABLE_CACHES=1.
    """
    import torch._library.triton as library_triton

    def register(fn):
        scan = getattr(library_triton, "get_inner_triton_kernels", None)
        if scan is not None:
            library_triton.get_inner_triton_kernels = lambda body: []
        try:
            return torch.library.triton_op(name, mutates_args=mutates_args)(fn)
        finally:
            if scan is not None:
                library_triton.get_inner_triton_kernels = scan

    return register


def launchers():
    """The host-side launch functions (imports triton: call only when `available()`)."""
    from . import launch

    return launch
