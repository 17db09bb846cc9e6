"""Incoherence processing (QuIP): W' = U W Vᵀ and H' = V H Vᵀ with seeded randomized Hadamard transforms.

V = F_n·diag(su) acts on the input side, U = F_m·diag(sv) on the output side (F = the orthonormal
Hadamard of `hadamard.plan`). At run time y = Uᵀ(Ŵ'(V x)): the input is rotated forward, the output
rotated back (`lowbit::rotated_linear`). Both sign vectors come from one recorded seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .. import hadamard


def layer_seed(seed: int, fqn: str) -> int:
    """A stable 62-bit seed per layer from the recipe seed and the layer's name (platform independent)."""
    digest = hashlib.sha256(f"{seed}:{fqn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@dataclass
class Transform:
    su: torch.Tensor  # (in_features,) ±1
    sv: torch.Tensor | None  # (out_features,) ±1, None when the output side is not rotated
    had_in: torch.Tensor | None
    had_out: torch.Tensor | None

    @classmethod
    def from_seed(cls, in_features: int, out_features: int, seed: int, rotate_output: bool = True) -> Transform:
        su = hadamard.random_signs(in_features, seed)
        sv = hadamard.random_signs(out_features, seed + 1) if rotate_output else None
        return cls(su, sv, hadamard.factor(in_features), hadamard.factor(out_features) if rotate_output else None)

    def rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """U W Vᵀ."""
        w = hadamard.apply(w, self.su, self.had_in)  # rows: W Vᵀ
        if self.sv is not None:
            w = hadamard.apply(w.t(), self.sv, self.had_out).t()  # columns: U (W Vᵀ)
        return w.contiguous()

    def unrotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Uᵀ W' V: the weight the rotated layer applies to un-rotated inputs."""
        if self.sv is not None:
            w = hadamard.apply(w.t(), self.sv, self.had_out, inverse=True).t()
        return hadamard.apply(w, self.su, self.had_in, inverse=True).contiguous()

    def rotate_hessian(self, h: torch.Tensor) -> torch.Tensor:
        """V H Vᵀ for a Hessian of the inputs, H = E[x xᵀ]."""
        h = hadamard.apply(h, self.su, self.had_in)
        return hadamard.apply(h.t(), self.su, self.had_in).t().contiguous()
