"""Orthonormal randomized Hadamard transforms for any dimension.

n = K * P with P = 2**k. The transform is (F_K kron H_P / sqrt(P)) diag(signs), where
- H_P is the Sylvester Hadamard matrix, applied in O(n log P) butterfly stages;
- F_K is an orthonormal K x K "factor": H_K / sqrt(K) for a known Hadamard matrix of order K
  (Paley I: K = q + 1, q = 3 mod 4 a prime power; Paley II: K = 2(q + 1), q = 1 mod 4 a prime power),
  applied as a small dense matmul; or, where no construction of order m * 2**j is known, a seeded Haar-random
  orthogonal matrix of the odd part m (QuIP's Kronecker construction), so that every n works.

`plan(n)` picks the smallest K with a known Hadamard matrix (up to MAX_HADAMARD_ORDER), else the random
factor. Everything here is deterministic: the random factor's seed is a function of its size alone
(`random_factor_seed`), and the per-layer randomness is the sign vector, drawn from a recorded seed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import LowbitError

MAX_HADAMARD_ORDER = 1024  # largest dense Hadamard factor we build (q <= 1023 in Paley)
MAX_RANDOM_FACTOR = 8192  # largest odd part we accept for the random orthogonal fallback


# ----------------------------------------------------------------------------- finite fields


def _factor_prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p**e, or None."""
    if q < 2:
        return None
    for p in range(2, int(math.isqrt(q)) + 1):
        if q % p == 0:
            e = 0
            while q % p == 0:
                q //= p
                e += 1
            return (p, e) if q == 1 else None
    return q, 1


def _irreducible_poly(p: int, e: int) -> list[int]:
    """Coefficients (low to high, monic) of the first irreducible polynomial of degree e over GF(p)."""
    import itertools

    def polymod_zero(a: list[int], b: list[int]) -> bool:  # does b divide a over GF(p)
        a = a[:]
        inv = pow(b[-1], p - 2, p)
        while len(a) >= len(b):
            f = a[-1] * inv % p
            off = len(a) - len(b)
            for i, c in enumerate(b):
                a[off + i] = (a[off + i] - f * c) % p
            a.pop()
            while a and a[-1] == 0:
                a.pop()
        return not a

    for tail in itertools.product(range(p), repeat=e):
        f = list(tail) + [1]
        if f[0] == 0:
            continue
        reducible = False
        for d in range(1, e // 2 + 1):
            for dt in itertools.product(range(p), repeat=d):
                if polymod_zero(f, list(dt) + [1]):
                    reducible = True
                    break
            if reducible:
                break
        if not reducible:
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(q): the quadratic character, chi(0) = 0. Elements are base-p digit ints."""
    p, e = _factor_prime_power(q)
    digits = np.array([[(x // p**i) % p for i in range(e)] for x in range(q)], dtype=np.int64)
    weights = p ** np.arange(e)
    if e == 1:
        squares = {(x * x) % p for x in range(1, p)}
    else:
        f = _irreducible_poly(p, e)

        def mul(a, b):
            prod = [0] * (2 * e - 1)
            for i, ai in enumerate(a):
                for j, bj in enumerate(b):
                    prod[i + j] = (prod[i + j] + ai * bj) % p
            for k in range(len(prod) - 1, e - 1, -1):  # reduce by the monic f
                c = prod[k]
                if c:
                    for i in range(e + 1):
                        prod[k - e + i] = (prod[k - e + i] - c * f[i]) % p
            return prod[:e]

        squares = {int(np.dot(mul(list(d), list(d)), weights)) for d in digits[1:]}
    chi = np.full(q, -1, dtype=np.int64)
    chi[list(squares)] = 1
    chi[0] = 0
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[diff @ weights]


# ----------------------------------------------------------------------------- constructions


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _paley1(q: int) -> np.ndarray:
    """Order q + 1 for a prime power q = 3 mod 4."""
    Q = _jacobsthal(q)
    S = np.zeros((q + 1, q + 1), dtype=np.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return np.eye(q + 1, dtype=np.int64) + S


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1) for a prime power q = 1 mod 4."""
    Q = _jacobsthal(q)
    C = np.zeros((q + 1, q + 1), dtype=np.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    a = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    b = np.array([[1, 1], [1, -1]], dtype=np.int64)
    return np.kron(C, a) + np.kron(np.eye(q + 1, dtype=np.int64), b)


def construction(order: int) -> str | None:
    """Name of the construction used for a Hadamard matrix of this order, or None if none is known here."""
    if order >= 1 and order & (order - 1) == 0:
        return "sylvester"
    if order % 4 or order > MAX_HADAMARD_ORDER:
        return None
    pe = _factor_prime_power(order - 1)
    if pe and (order - 1) % 4 == 3:
        return f"paley1(q={order - 1})"
    if order % 2 == 0:
        q = order // 2 - 1
        pe = _factor_prime_power(q)
        if pe and q % 4 == 1:
            return f"paley2(q={q})"
    return None


@functools.lru_cache(maxsize=64)
def hadamard_matrix(order: int) -> np.ndarray:
    """A ±1 Hadamard matrix (H Hᵀ = order·I, checked) of a supported order, as int8."""
    name = construction(order)
    if name is None:
        raise LowbitError(f"no Hadamard construction of order {order} is known here")
    if name == "sylvester":
        h = _sylvester(order)
    elif name.startswith("paley1"):
        h = _paley1(order - 1)
    else:
        h = _paley2(order // 2 - 1)
    hf = h.astype(np.float64)  # float64 BLAS is exact here: every entry of H Hᵀ is an integer <= 1024
    assert np.array_equal(hf @ hf.T, order * np.eye(order)), f"bad Hadamard of order {order}"
    return h.astype(np.int8)


def random_factor_seed(m: int) -> int:
    return 0x10B17 + m


@functools.lru_cache(maxsize=16)
def _random_orthogonal(m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(random_factor_seed(m))
    a = torch.randn(m, m, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32).contiguous()  # Haar-distributed


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class HadamardPlan:
    """n = factor_size * pow2; `kind` names the dense factor ("none" when n is a power of two)."""

    n: int
    factor_size: int
    pow2: int
    kind: str

    @property
    def has_factor(self) -> bool:
        return self.factor_size > 1


@functools.cache
def plan(n: int) -> HadamardPlan:
    if n < 1:
        raise LowbitError(f"Hadamard transform of size {n}: the size must be positive")
    a = (n & -n).bit_length() - 1
    m = n >> a
    if m == 1:
        return HadamardPlan(n, 1, n, "none")
    for j in range(2, a + 1):
        k = m << j
        if k > MAX_HADAMARD_ORDER:
            break
        name = construction(k)
        if name:
            return HadamardPlan(n, k, n // k, name)
    if m > MAX_RANDOM_FACTOR:
        raise LowbitError(
            f"dimension {n} = {m}·2^{a}: no Hadamard construction is known and the odd part {m} is too large "
            f"for a dense random orthogonal factor (limit {MAX_RANDOM_FACTOR}); keep this layer un-rotated "
            f"or in float with a per-layer override"
        )
    return HadamardPlan(n, m, 1 << a, f"random_orthogonal(m={m}, seed={random_factor_seed(m)})")


def factor(n: int) -> torch.Tensor | None:
    """The orthonormal dense factor F_K (float32) for size n, or None when n is a power of two."""
    p = plan(n)
    if not p.has_factor:
        return None
    if p.kind.startswith("random"):
        return _random_orthogonal(p.factor_size).clone()
    h = hadamard_matrix(p.factor_size)
    return torch.from_numpy(h.astype(np.float32) / np.float32(math.sqrt(p.factor_size)))


def random_signs(n: int, seed: int) -> torch.Tensor:
    """±1 float32 vector of length n from a recorded seed."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) * 2 - 1).to(torch.float32)


# ----------------------------------------------------------------------------- the transform


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Sylvester-Hadamard transform of the last dimension (a power of two), in butterflies."""
    n = x.shape[-1]
    if n & (n - 1):
        raise LowbitError(f"fwht needs a power-of-two size, got {n}")
    shape = x.shape
    if x.requires_grad and torch.is_grad_enabled():  # out= has no autograd: the stacking form (block fine-tuning)
        h = 1
        while h < n:
            y = x.reshape(-1, n // (2 * h), 2, h)
            a, b = y[:, :, 0], y[:, :, 1]
            x = torch.stack((a + b, a - b), dim=2)
            h *= 2
        return x.reshape(shape)
    if n == 1:
        return x.clone()
    # two buffers in turn: each stage writes its sums and differences straight into place (the same additions as
    # stacking a + b and a - b, without the temporaries and the copy: the same values)
    bufs = [torch.empty(x.numel(), dtype=x.dtype, device=x.device) for _ in range(2 if n > 2 else 1)]
    h, i = 1, 0
    while h < n:
        y = x.reshape(-1, n // (2 * h), 2, h)
        out = bufs[i].view(y.shape)
        torch.add(y[:, :, 0], y[:, :, 1], out=out[:, :, 0])
        torch.sub(y[:, :, 0], y[:, :, 1], out=out[:, :, 1])
        x, i, h = out, (i + 1) % len(bufs), h * 2
    return x.reshape(shape)


def apply(x: torch.Tensor, signs: torch.Tensor | None, factor_mat: torch.Tensor | None,
          inverse: bool = False) -> torch.Tensor:
    """Forward: y = (F kron H_P/√P)(signs ⊙ x). Inverse: signs ⊙ (Fᵀ kron H_P/√P) y. Last dimension."""
    n = x.shape[-1]
    k = 1 if factor_mat is None else factor_mat.shape[0]
    if n % k or (n // k) & (n // k - 1):
        raise LowbitError(f"Hadamard factor of size {k} does not fit a last dimension of {n}: use factor({n})")
    p = n // k
    if signs is not None and not inverse:
        x = x * signs
    y = fwht(x.reshape(*x.shape[:-1], k, p))
    if factor_mat is not None:
        f = factor_mat.to(y.dtype)
        y = torch.matmul(f.t() if inverse else f, y)
    y = y.reshape(x.shape) * (1.0 / math.sqrt(p))
    if signs is not None and inverse:
        y = y * signs
    return y


def dense(n: int) -> torch.Tensor:
    """The full orthonormal n x n matrix F kron H_P / √P (float64), for tests and small reference checks."""
    p = plan(n)
    h = torch.from_numpy(_sylvester(p.pow2).astype(np.float64)) / math.sqrt(p.pow2)
    f = factor(n)
    return h if f is None else torch.kron(f.to(torch.float64), h)
