"""QuantizedLinear: everything needed to run one quantized linear, and to reproduce it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import formats, hadamard
from .kernels import reference
from .quantize.incoherence import Transform


@dataclass
class QuantizedLinear:
    fqn: str
    method: str  # "rtn", ...
    bits: int
    in_features: int
    out_features: int
    group_size: int
    qweight: torch.Tensor  # uint8, (out_features, packed_length(in_features, bits))
    scales: torch.Tensor  # float16, (out_features, groups)
    seed: int | None  # transform seed; None when not rotated
    su: torch.Tensor | None  # float32 ±1 (in_features,)
    sv: torch.Tensor | None  # float32 ±1 (out_features,)
    weight_error: float  # ||Ŵ - W||_F / ||W||_F
    proxy_loss: float | None = None  # tr((Ŵ-W) H (Ŵ-W)ᵀ) when a Hessian was available

    @property
    def fmt(self) -> str:
        return f"int{self.bits}"

    @property
    def rotated(self) -> bool:
        return self.su is not None

    def transform(self) -> Transform | None:
        if self.su is None:
            return None
        return Transform(self.su, self.sv, hadamard.factor(self.in_features),
                         hadamard.factor(self.out_features) if self.sv is not None else None)

    def rotated_weight(self) -> torch.Tensor:
        return reference.dequantize_weight(self.qweight, self.scales, self.bits, self.in_features,
                                           self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer applies to un-rotated inputs (Uᵀ Ŵ' V): the float reference."""
        w = self.rotated_weight()
        t = self.transform()
        return w if t is None else t.unrotate_weight(w)

    def bits_per_weight(self) -> float:
        """Codes + float16 scales + one bit per sign, as stored."""
        sign_bits = (0 if self.su is None else self.in_features) + (0 if self.sv is None else self.out_features)
        return formats.bits_per_weight(formats.int_format(self.bits), self.in_features, self.out_features,
                                       self.group_size, sign_bits)
