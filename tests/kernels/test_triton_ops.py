"""The lowbit ops' device branch and the Triton kernels' GPU-side checks that need no GPU.

- CPU: the ops call the opaque `lowbit::*_reference` ops, in eager and under torch.compile (an extern call).
- CUDA: the triton_op bodies trace to `triton_kernel_wrapper_functional` nodes of our kernels (fake CUDA
  tensors), and the kernels compile to cubins for sm_90 at real model shapes (Triton's own ptxas).
- The package imports and runs without triton.
- On a GPU only (skipped here): ops on CUDA against the reference, and torch.compile(backend="lowbit") emitting
  the kernels.

The kernels' numbers are checked under TRITON_INTERPRET=1 in test_triton_hadamard.py / test_triton_matmul.py.
"""

import logging
import subprocess
import sys

import pytest
import torch

import lowbit_compile as lb
from lowbit_compile import hadamard as H
from lowbit_compile.formats import fp4 as f4
from lowbit_compile.quantize.layer import quantize_weight
from lowbit_compile.recipe import parse_spec

pytestmark = pytest.mark.usefixtures("one_thread")
needs_triton = pytest.mark.skipif(not lb.kernels.triton.available(), reason="triton is not installed")
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and lb.kernels.triton.available()),
                               reason="needs a CUDA GPU and triton")


def rotated_args(x, recipe="w4", shape=(96, 192), bias=True):
    rec = quantize_weight("layer", torch.randn(*shape, generator=torch.Generator().manual_seed(0)),
                          parse_spec(recipe), seed=0)
    t = rec.transform()
    b = torch.randn(shape[0]) if bias else None
    return (x, rec.qweight, rec.scales, rec.su, rec.sv, t.had_in if t else None, t.had_out if t else None, b,
            rec.bits, rec.in_features, rec.group_size)


def fp4_args(x, a_format="e2m1", n_out=24):
    n = x.shape[-1]
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n_out, n), dtype=torch.uint8, generator=g)
    return (x, f4.pack_codes(codes), (torch.rand(n_out, 1, generator=g) * 0.1).half(),
            torch.randint(0, 3, (n,), dtype=torch.uint8, generator=g),
            torch.tensor([0.5], dtype=torch.float16) if a_format else None, "e1m2", a_format, None, n)


def hadamard_args(x):
    n = x.shape[-1]
    return (x, H.random_signs(n, 0), H.factor(n), False)


CALLS = {
    "hadamard": (torch.ops.lowbit.hadamard.default, hadamard_args),
    "rotated_linear": (torch.ops.lowbit.rotated_linear.default, rotated_args),
    "fp4_linear": (torch.ops.lowbit.fp4_linear.default, fp4_args),
}


def test_the_three_ops_are_triton_ops_with_an_opaque_reference():
    from torch._library.custom_ops import OPDEFS

    for name in CALLS:
        assert f"lowbit::{name}" in torch._library.triton.triton_ops_to_kernels  # registered by triton_op
        assert f"lowbit::{name}_reference" in OPDEFS  # the opaque path every non-CUDA device takes


# ----------------------------------------------------------------------------- CPU


def test_cpu_under_torch_compile_is_an_extern_call_to_the_reference():
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(3, 192)
    rot = rotated_args(x)
    had = hadamard_args(x)
    fp4 = fp4_args(x)

    def f(x):
        h = torch.ops.lowbit.hadamard(x, *had[1:])
        return h, torch.ops.lowbit.rotated_linear(h, *rot[1:]), torch.ops.lowbit.fp4_linear(x, *fp4[1:])

    with torch.no_grad():
        ys, (code, *_) = run_and_get_code(torch.compile(f, backend="inductor", fullgraph=True), x)
        for y, ref in zip(ys, f(x)):
            assert torch.equal(y, ref)  # the same reference code runs, compiled or not
    for name in CALLS:
        assert f"torch.ops.lowbit.{name}_reference.default" in code, name


def test_package_imports_and_runs_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"  # every `import triton` raises ImportError
        "import torch, lowbit_compile\n"
        "from lowbit_compile.kernels import triton as gpu\n"
        "assert not gpu.available()\n"
        "x = torch.randn(2, 12)\n"
        "y = torch.ops.lowbit.hadamard(x, None, lowbit_compile.hadamard.factor(12), False)\n"
        "print('ran', tuple(y.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ran (2, 12)" in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------- CUDA, without a GPU


def _fake_cuda(args):
    """Fake CUDA tensors of the same shapes and dtypes (must run inside a FakeTensorMode)."""
    return [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda") if isinstance(a, torch.Tensor)
            else a for a in args]


def _kernels_in(gm):
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    return {kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in gm.graph.nodes
            if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)}


@needs_triton
@pytest.mark.parametrize("name,expected", [
    ("hadamard", {"fwht_kernel", "factor_kernel"}),
    ("rotated_linear", {"fwht_kernel", "factor_kernel", "lowbit_matmul_kernel"}),
    ("fp4_linear", {"lowbit_matmul_kernel"}),
])
def test_cuda_branch_traces_to_the_triton_kernels(name, expected):
    """What AOTAutograd hands Inductor on CUDA: the triton_op body decomposed into our kernel launches."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    op, make_args = CALLS[name]
    args = make_args(torch.randn(5, 192, dtype=torch.bfloat16))
    with FakeTensorMode():
        fake = _fake_cuda(args)
    # without a GPU Triton cannot analyse which arguments a kernel writes, logs why and assumes all: fine here
    log = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        gm = make_fx(dispatch_functionalize(lambda *a: op(*a)), tracing_mode="fake")(*fake)
    finally:
        log.setLevel(level)
    assert _kernels_in(gm) == expected
    assert "reference" not in gm.code
    cpu_gm = make_fx(dispatch_functionalize(lambda *a: op(*a)), tracing_mode="fake")(*args)
    assert not _kernels_in(cpu_gm) and f"lowbit.{name}_reference" in cpu_gm.code


def _launches(fn, *args):
    from lowbit_compile.kernels.triton import aot

    return aot.record_launches(fn, *args)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


@needs_triton
def test_kernels_compile_for_sm90_at_llama_shapes():
    """A representative launch of every kernel and schedule, as the launchers size them for 4096 / 11008."""
    from lowbit_compile.formats import packing
    from lowbit_compile.kernels.triton import aot, launch

    bf16 = torch.bfloat16
    h11008 = _launches(launch.hadamard, _meta(2048, 11008, dtype=bf16), _meta(11008), _meta(344, 344), True)
    h4096 = _launches(launch.hadamard, _meta(2048, 4096, dtype=bf16), _meta(4096), None, False)
    h32768 = _launches(launch.hadamard, _meta(4, 32768), _meta(32768), None, False)

    def matmul(m, bits, group, dtype=bf16):
        k, n = 4096, 11008
        return _launches(launch._matmul, _meta(m, k, dtype=dtype), _meta(n, packing.packed_length(k, bits),
                         dtype=torch.uint8), _meta(n, k // group if group else 1, dtype=torch.float16), bits, group,
                         dtype, launch._dot_kind(dtype))

    w4a4 = _launches(launch.fp4_linear, _meta(2048, 4096, dtype=bf16), _meta(4096, 2048, dtype=torch.uint8),
                     _meta(4096, 1, dtype=torch.float16), _meta(4096, dtype=torch.uint8),
                     _meta(1, dtype=torch.float16), "e2m1", "e2m1", None, 4096)
    chosen = (h11008 + h4096 + h32768 + matmul(1, 4, 0) + matmul(8, 3, 0) + matmul(2048, 2, 64)
              + matmul(2048, 3, 32, torch.float32) + w4a4)
    names = {r.name for r in chosen}
    assert names == {"fwht_kernel", "fwht_strided_kernel", "factor_kernel", "lowbit_matmul_kernel"}
    for rec in {r.key(): r for r in chosen}.values():
        compiled = aot.compile_launch(rec, arch=90)
        assert compiled.asm.get("cubin"), rec.name


# ----------------------------------------------------------------------------- on a GPU


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ops_on_cuda_match_the_reference(dtype):
    x = torch.randn(7, 192).to(dtype)
    for name, (op, make_args) in CALLS.items():
        args = make_args(x)
        ref = op(*args)  # CPU: the reference
        y = op(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args]).cpu()
        rel = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
        assert rel < (1e-5 if dtype == torch.float32 else 1.5e-2), (name, rel)


@needs_gpu
def test_torch_compile_lowbit_backend_emits_the_triton_kernels():
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    lb.reset()
    model = torch.nn.Sequential(torch.nn.Linear(192, 96), torch.nn.GELU(), torch.nn.Linear(96, 192)).cuda()
    x = torch.randn(4, 192, device="cuda")
    from tinymodels import with_weights

    with torch.no_grad():
        compiled = torch.compile(model, backend="lowbit", options={"recipe": "w4"})
        y, codes = run_and_get_code(compiled, x)
        ref = with_weights(model, lb.last_report().records)(x)  # float model with the dequantized weights
    code = "\n".join(codes)
    for kernel in ("fwht_kernel", "factor_kernel", "lowbit_matmul_kernel"):  # 192 = 12·16, 96 = 12·8
        assert kernel in code, kernel
    assert "_reference" not in code
    assert ((y - ref).norm() / ref.norm()).item() < 1e-4
    torch._dynamo.reset()
    lb.reset()
