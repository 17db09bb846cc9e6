"""Triton Hadamard kernels under TRITON_INTERPRET=1 on CPU, against `reference.hadamard_ref`.

The checks run in one subprocess (TRITON_INTERPRET must be set before triton is imported): this file is also
the script, see `lowbit_compile.kernels.triton.interpret`.
"""

import torch

from lowbit_compile.kernels.triton import interpret

CHECKS = interpret.Checks()


def _compare(n, dtype, inverse, rows=3, with_signs=True, seed=0, bias=False):
    from lowbit_compile import hadamard as H
    from lowbit_compile.kernels import reference
    from lowbit_compile.kernels.triton import launch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g).to(dtype)
    s = H.random_signs(n, seed + 1) if with_signs else None
    f = H.factor(n)
    b = torch.randn(n, generator=g) if bias else None
    y = launch.hadamard(x, s, f, inverse, bias=b)
    ref = reference.hadamard_ref(x.float(), s, f, inverse)  # the reference computes 16-bit inputs in float32
    if b is not None:
        ref = ref + b
    ref = ref.to(dtype)
    assert y.dtype == dtype and y.shape == x.shape, (y.dtype, y.shape)
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=2e-6, msg=lambda m: f"n={n} inverse={inverse}: {m}")
    else:  # both round nearly the same float32 value: one unit in the last place apart, or a tiny value
        atol = 2**-12 * ref.float().pow(2).mean().sqrt().item()
        torch.testing.assert_close(y.float(), ref.float(), rtol=2**-7, atol=atol,
                                   msg=lambda m: f"n={n} {dtype} inverse={inverse}: {m}")


@CHECKS.add
def powers_of_two_every_tile_shape():
    # 1..128: one (rows, P) tile, P < 16 without tl.dot; from 256: H_R·X·H_C, R, C >= 16 (2048: two column chunks)
    for n in (1, 2, 8, 16, 64, 128, 256, 512, 2048):
        for inverse in (False, True):
            _compare(n, torch.float32, inverse)


@CHECKS.add
def sixteen_bit_inputs_keep_their_dtype():
    for dtype in (torch.bfloat16, torch.float16):
        for n in (8, 64, 256):
            for inverse in (False, True):
                _compare(n, dtype, inverse)


@CHECKS.add
def without_signs_sylvester_is_an_involution():
    from lowbit_compile.kernels.triton import launch

    x = torch.randn(4, 256)
    y = launch.hadamard(launch.hadamard(x, None, None), None, None)
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    _compare(64, torch.float32, False, with_signs=False)


@CHECKS.add
def k_times_power_of_two_with_the_dense_factor():
    # Paley factors 12, 20, 28 (448 = 28·16), 344 (688 = 344·2); random orthogonal 7 (P = 1) and 3 (6 = 3·2)
    for n in (12, 20, 96, 448, 688, 7, 6):
        for inverse in (False, True):
            _compare(n, torch.float32, inverse)
    _compare(96, torch.bfloat16, False)
    _compare(96, torch.float16, True)


@CHECKS.add
def inverse_undoes_forward():
    from lowbit_compile import hadamard as H
    from lowbit_compile.kernels.triton import launch

    for n in (64, 96, 512):
        x = torch.randn(2, 5, n)
        s, f = H.random_signs(n, 3), H.factor(n)
        y = launch.hadamard(launch.hadamard(x, s, f), s, f, inverse=True)
        torch.testing.assert_close(y, x, rtol=1e-5, atol=2e-6)


@CHECKS.add
def bias_is_fused_into_the_inverse():
    for n in (64, 96):
        _compare(n, torch.float32, True, bias=True)
    _compare(96, torch.bfloat16, True, bias=True)


@CHECKS.add
def two_pass_transform_above_the_fused_limit():
    from lowbit_compile.kernels.triton import launch

    # the real limit: 2^15 = 32 pieces of 2^10, then H_32 with stride 2^10
    _compare(1 << 15, torch.float32, False, rows=1)
    _compare(1 << 15, torch.bfloat16, True, rows=1)
    # the same logic at small sizes: fused up to 2^8, pieces of 2^5, S up to 128
    saved = launch.MAX_FUSED_POW2, launch.STRIDED_PIECE, launch.MAX_POW2
    launch.MAX_FUSED_POW2, launch.STRIDED_PIECE, launch.MAX_POW2 = 1 << 8, 1 << 5, 1 << 12
    try:
        for n in (1 << 10, 12 << 10, 1 << 12):
            for inverse in (False, True):
                _compare(n, torch.float32, inverse, rows=2)
    finally:
        launch.MAX_FUSED_POW2, launch.STRIDED_PIECE, launch.MAX_POW2 = saved


@CHECKS.add
def leading_dimensions_and_non_contiguous_input():
    from lowbit_compile import hadamard as H
    from lowbit_compile.kernels import reference
    from lowbit_compile.kernels.triton import launch

    x = torch.randn(96, 2, 3).permute(1, 2, 0)  # (2, 3, 96), not contiguous
    s, f = H.random_signs(96, 0), H.factor(96)
    torch.testing.assert_close(launch.hadamard(x, s, f), reference.hadamard_ref(x, s, f), rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------------------- pytest side


interpreted, test_interpreted = CHECKS.pytest_side(__file__)


if __name__ == "__main__":
    interpret.main(CHECKS)
