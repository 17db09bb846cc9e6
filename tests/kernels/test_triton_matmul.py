"""Triton decode and dequant-matmul kernels under TRITON_INTERPRET=1 on CPU, against `formats/` and the references.

Decoding is compared bit for bit (packed codes, FP4 values, FP4 activation rounding); the matmuls
(`lowbit::rotated_linear` with its Hadamard transforms, `lowbit::fp4_linear` W4A16/W4A4) closely. One subprocess
runs every check: this file is also the script, see `lowbit_compile.kernels.triton.interpret`.
"""

import torch

from lowbit_compile.kernels.triton import interpret

CHECKS = interpret.Checks()


# ----------------------------------------------------------------------------- decoding, bit for bit


@CHECKS.add
def packed_codes_decode_exactly():
    from lowbit_compile import formats

    g = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 8):
        for n in (1, 7, 37, 64):  # partial byte groups at the end of a row
            codes = torch.randint(0, 1 << bits, (5, n), dtype=torch.uint8, generator=g)
            packed = formats.pack(codes, bits)
            per_group, _ = formats.packing.group_shape(bits)
            groups = -(-n // per_group)
            out = torch.full((5, groups * per_group), 255, dtype=torch.int32)
            _decode_codes_kernel[(5,)](packed, out, packed.shape[1], groups,
                                       BITS=bits, L=per_group, BLOCK=triton.next_power_of_2(groups))
            assert torch.equal(out[:, :n], codes.to(torch.int32)), (bits, n)


@CHECKS.add
def fp4_codes_decode_exactly():
    from lowbit_compile.formats import fp4 as f4

    codes = torch.arange(16, dtype=torch.int32)
    for fmt in f4.FP4_FORMATS.values():
        out = torch.empty(16, dtype=torch.float32)
        _fp4_value_kernel[(1,)](codes, out, E=fmt.e_bits, M=fmt.m_bits)
        grid = fmt.grid(0.0)
        assert torch.equal(out, grid), (fmt.name, out, grid)
        assert torch.equal(torch.signbit(out), torch.signbit(grid)), fmt.name  # code 8 is -0.0


@CHECKS.add
def fp4_activation_rounding_is_bit_exact():
    from lowbit_compile.formats import fp4 as f4

    g = torch.Generator().manual_seed(1)
    for fmt in f4.FP4_FORMATS.values():
        for scale in (0.37, 1.0, 2.0**-6):
            s = torch.tensor([scale], dtype=torch.float16)
            mags = fmt.grid(0.0)[:8]
            ties = (mags[:-1] + mags[1:]) / 2  # every half-way point: ties to the even code
            x = torch.cat([torch.randn(4000, generator=g) * 4, -ties, ties, mags, -mags, mags * 1.5,
                           torch.tensor([0.0, -0.0, 1e-30, 1e4, -1e4, float("inf"), -float("inf")])])
            x = x * s.float()
            out = torch.empty_like(x)
            _fp4_round_kernel[(1,)](x, s, out, x.numel(), E=fmt.e_bits, M=fmt.m_bits,
                                    MAX_VALUE=fmt.max_value(0.0), BLOCK=triton.next_power_of_2(x.numel()))
            ref = f4.quantize(x, fmt, s.float())
            assert torch.equal(out * s.float(), ref), (fmt.name, scale, (out * s.float() - ref).abs().max())


# ----------------------------------------------------------------------------- matmuls


def _rotated_args(recipe, shape, x, bias=None, seed=1):
    from lowbit_compile.quantize.layer import quantize_weight
    from lowbit_compile.recipe import parse_spec

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    rec = quantize_weight("layer", w, parse_spec(recipe), seed=seed)
    t = rec.transform()
    return (x, rec.qweight, rec.scales, rec.su, rec.sv, t.had_in if t else None, t.had_out if t else None, bias,
            rec.bits, rec.in_features, rec.group_size)


def _assert_close(y, ref, what):
    assert y.dtype == ref.dtype and y.shape == ref.shape, (what, y.dtype, y.shape, ref.shape)
    rel = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
    # float32: float32 accuracy. 16-bit: operands rounded to bfloat16/float16 on the tensor cores (the reference
    # keeps them in float32) plus the output rounding
    limit = 1e-5 if y.dtype == torch.float32 else 1.5e-2
    assert rel < limit, f"{what}: relative error {rel:.2e} (limit {limit:.0e})"


def _rotated(recipe, shape, m, dtype, bias=True):
    from lowbit_compile.kernels import reference
    from lowbit_compile.kernels.triton import launch

    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, shape[1], generator=g).to(dtype)
    b = torch.randn(shape[0], generator=g) if bias else None
    args = _rotated_args(recipe, shape, x, b)
    _assert_close(launch.rotated_linear(*args), reference.rotated_linear_ref(*args), f"{recipe} {shape} M={m} {dtype}")


@CHECKS.add
def rotated_linear_every_width_gemv_and_gemm():
    # M = 1, 3: GEMV (broadcast-reduce); 8: GEMV with tl.dot; 20: GEMM. Hadamard on both sides (QuIP).
    for recipe in ("w2", "w3", "w4", "w8"):
        for m in (1, 3, 8, 20):
            _rotated(recipe, (40, 64), m, torch.float32)


@CHECKS.add
def rotated_linear_sixteen_bit_activations():
    for dtype in (torch.bfloat16, torch.float16):
        for m in (1, 20):
            _rotated("w4", (40, 64), m, dtype)
            _rotated("w3", (40, 64), m, dtype, bias=False)
    _rotated("w2", (40, 64), 8, torch.bfloat16)  # GEMV with tl.dot in bfloat16


@CHECKS.add
def rotated_linear_group_scales_and_dense_factors():
    # 96 = 12·8, 192 = 12·16: Paley factors in both transforms. g32: a scale per 32 columns, applied per K tile
    # (K tiles of 32: GEMV, 4-bit GEMM) or per element (2/3-bit GEMM, whose K tiles are wider than a group)
    for recipe, ms in (("w2-g32", (1, 8, 20)), ("w3-rtn-g32", (1, 20)), ("w4-g32", (20,))):
        for m in ms:
            _rotated(recipe, (96, 192), m, torch.float32)
    _rotated("w2-g32", (96, 192), 20, torch.bfloat16)


@CHECKS.add
def plain_low_bit_linear_without_transforms():
    for recipe in ("w4-rtn", "w2-rtn", "w3-rtn"):
        for m in (1, 20):
            _rotated(recipe, (24, 40), m, torch.float32)  # in_features 40: a partial K tile


@CHECKS.add
def leading_dimensions_are_kept():
    from lowbit_compile.kernels import reference
    from lowbit_compile.kernels.triton import launch

    x = torch.randn(2, 3, 64)
    args = _rotated_args("w4", (40, 64), x)
    y = launch.rotated_linear(*args)
    assert y.shape == (2, 3, 40)
    _assert_close(y, reference.rotated_linear_ref(*args), "(2, 3, 64) input")


def _fp4_layer(w_fmt, a_fmt, shift, m=24, n=37, seed=0):
    from lowbit_compile.formats import fp4 as f4

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (m, n), dtype=torch.uint8, generator=g)
    w_scales = (torch.rand(m, 1, generator=g) * 0.1 + 0.01).to(torch.float16)
    act_shift = torch.randint(0, 4, (n,), dtype=torch.uint8, generator=g) if shift else None
    act_scale = torch.tensor([0.37], dtype=torch.float16) if a_fmt else None
    return (f4.pack_codes(codes), w_scales, act_shift, act_scale, w_fmt, a_fmt)


FP4_CASES = [("e2m1", None, False), ("e1m2", None, True), ("e2m1", "e2m1", True), ("e3m0", "e1m2", False),
             ("e1m2", "e3m0", True)]


@CHECKS.add
def fp4_linear_w4a16_and_w4a4():
    from lowbit_compile.kernels.fp4_ops import fp4_linear_ref
    from lowbit_compile.kernels.triton import launch

    for w_fmt, a_fmt, shift in FP4_CASES:
        layer = _fp4_layer(w_fmt, a_fmt, shift)
        for m in (1, 5, 20):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, 37, generator=torch.Generator().manual_seed(m)).to(dtype)
                bias = torch.randn(24) if m == 5 else None
                args = (x, *layer, bias, 37)
                _assert_close(launch.fp4_linear(*args), fp4_linear_ref(*args), f"{w_fmt}/{a_fmt} M={m} {dtype}")


@CHECKS.add
def fp4_linear_w4a4_products_are_exact():
    """W4A4 multiplies unscaled FP4 values (exact in bfloat16): only the float32 accumulation order differs."""
    from lowbit_compile.kernels.fp4_ops import dequantize_fp4_weight, fp4_linear_ref, quantize_fp4_activations
    from lowbit_compile.kernels.triton import launch

    qweight, w_scales, act_shift, act_scale, w_fmt, a_fmt = _fp4_layer("e2m1", "e2m1", True, m=40, n=64, seed=3)
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(4))
    args = (x, qweight, w_scales, act_shift, act_scale, w_fmt, a_fmt, None, 64)
    y, ref = launch.fp4_linear(*args), fp4_linear_ref(*args)
    h = quantize_fp4_activations(x, act_shift, act_scale, a_fmt).double()  # exact FP4 values
    exact = h @ dequantize_fp4_weight(qweight, w_scales, w_fmt, 64).double().T
    # the reference rounds each float32 product (28 significant bits); the kernel's products are exact
    assert (y.double() - exact).abs().max() <= (ref.double() - exact).abs().max()
    torch.testing.assert_close(y.double(), exact, rtol=1e-6, atol=1e-6 * exact.abs().max().item())


@CHECKS.add
def opaque_custom_op_runs_the_kernels_under_torch_compile():
    """The route the tests use on CPU: the launch inside an opaque custom op, compiled by Inductor."""
    from lowbit_compile.kernels import reference
    from lowbit_compile.kernels.triton import launch

    @torch.library.custom_op("lowbit_test::triton_rotated_linear", mutates_args=())
    def triton_rotated_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, su: torch.Tensor,
                              sv: torch.Tensor, had_in: torch.Tensor, had_out: torch.Tensor, bias: torch.Tensor,
                              bits: int, in_features: int, group_size: int) -> torch.Tensor:
        return launch.rotated_linear(x, qweight, scales, su, sv, had_in, had_out, bias, bits, in_features, group_size)

    @triton_rotated_linear.register_fake
    def _(x, qweight, scales, su, sv, had_in, had_out, bias, bits, in_features, group_size):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    x = torch.randn(3, 96)
    args = _rotated_args("w4", (96, 96), x, torch.randn(96))

    def f(x):
        return torch.relu(torch.ops.lowbit_test.triton_rotated_linear(x, *args[1:])) * 2

    y = torch.compile(f, backend="inductor", fullgraph=True)(x)
    _assert_close(y, torch.relu(reference.rotated_linear_ref(*args)) * 2, "compiled")


# ----------------------------------------------------------------------------- pytest side


interpreted, test_interpreted = CHECKS.pytest_side(__file__)


if __name__ == "__main__":
    # probe kernels: the decode helpers alone, on small tensors (defined here, in the interpreted process only)
    import triton
    import triton.language as tl

    from lowbit_compile.kernels.triton.decode import code_at, fp4_round, fp4_value, load_code_bytes

    @triton.jit
    def _decode_codes_kernel(q_ptr, out_ptr, stride_q, groups, BITS: tl.constexpr, L: tl.constexpr,
                             BLOCK: tl.constexpr):
        row = tl.program_id(0)
        g = tl.arange(0, BLOCK)
        mask = g < groups
        word = load_code_bytes(q_ptr, row * stride_q, g, mask, BITS)
        for i in tl.static_range(L):
            tl.store(out_ptr + row * groups * L + g * L + i, code_at(word, i, BITS), mask=mask)

    @triton.jit
    def _fp4_value_kernel(code_ptr, out_ptr, E: tl.constexpr, M: tl.constexpr):
        c = tl.arange(0, 16)
        tl.store(out_ptr + c, fp4_value(tl.load(code_ptr + c), E, M))

    @triton.jit
    def _fp4_round_kernel(x_ptr, scale_ptr, out_ptr, n, E: tl.constexpr, M: tl.constexpr,
                          MAX_VALUE: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        mask = i < n
        x = tl.load(x_ptr + i, mask=mask, other=0.0)
        tl.store(out_ptr + i, fp4_round(x, tl.load(scale_ptr).to(tl.float32), E, M, MAX_VALUE), mask=mask)

    interpret.main(CHECKS)
