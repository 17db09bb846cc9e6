"""Compile the kernels for a GPU target on a machine without one: catches what the interpreter cannot.

The interpreter (TRITON_INTERPRET=1) checks the numbers, but it accepts things the GPU compiler rejects (tl.dot
below its minimum size, unsupported casts, ...). `record_launches` runs a launcher from `launch.py` on fake
CUDA tensors, so shapes as large as a real model cost nothing, and records every kernel launch it would make;
`compile_launch` compiles one recorded launch to a cubin with Triton's own toolchain (ptxas ships with the
Triton wheel), exactly the specialisation the launch would ask for, minus the runtime's divisibility hints.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import launch

POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.uint8: "*u8",
                 torch.int32: "*i32", torch.int64: "*i64"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


@dataclass
class Launch:
    kernel: object  # the triton.JITFunction
    grid: tuple
    args: dict  # parameter name -> value (tensors are fake)
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self) -> tuple:
        sig, constexprs = self.signature()
        return (self.name, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())),
                tuple(sorted(self.options.items())))

    def signature(self) -> tuple[dict, dict]:
        """(Triton signature, constexpr values) of this launch."""
        sig, constexprs = {}, {}
        for p in self.kernel.params:
            v = self.args[p.name]
            if p.is_constexpr:
                sig[p.name] = "constexpr"
                constexprs[p.name] = v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = POINTER_TYPES[v.dtype]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            elif isinstance(v, float):
                sig[p.name] = "fp32"
            else:
                raise TypeError(f"{self.name}: cannot type argument {p.name}={v!r}")
        return sig, constexprs


class _Recorder:
    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
            named = dict(zip(self.kernel.arg_names, args))
            named.update(kwargs)
            self.launches.append(Launch(self.kernel, tuple(grid), named, options))

        return record


@contextlib.contextmanager
def _recording(launches: list):
    original = launch.wrap_triton
    launch.wrap_triton = lambda kernel: _Recorder(kernel, launches)
    try:
        yield
    finally:
        launch.wrap_triton = original


def record_launches(fn, *args, **kwargs) -> list[Launch]:
    """The kernel launches `fn(*args, **kwargs)` (a function of `launch.py`) makes on CUDA; nothing runs.

    Tensor arguments (any device; "meta" tensors cost nothing) become fake CUDA tensors of the same shape,
    strides and dtype.
    """
    launches: list[Launch] = []
    with FakeTensorMode():
        def fake(t):
            if not isinstance(t, torch.Tensor):
                return t
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")

        args = [fake(a) for a in args]
        kwargs = {k: fake(v) for k, v in kwargs.items()}
        with _recording(launches):
            fn(*args, **kwargs)
    return launches


def compile_launch(rec: Launch, arch: int = 90):
    """Compile one recorded launch for sm_{arch}; returns the CompiledKernel (asm: ttir ... ptx, cubin)."""
    sig, constexprs = rec.signature()
    src = ASTSource(fn=rec.kernel, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(rec.options))
