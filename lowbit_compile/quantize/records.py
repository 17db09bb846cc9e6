"""The quantized-linear records: everything needed to run one quantized linear, and to reproduce it.

Three kinds: `QuantizedLinear` (integer codes, optionally with a randomized-Hadamard transform:
`lowbit::rotated_linear`), `FP4QuantizedLinear` (LLM-FP4 codes with per-row scales, optionally FP4
activations with per-channel exponents: `lowbit::fp4_linear`) and `E8QuantizedLinear` (E8 lattice codes, 8 weights
per code, rotated: `lowbit::e8p_linear`). Each record's `dequantized_weight()` is the
float32 weight it applies to the original inputs, and `bits_per_weight()` counts everything it stores.
`weight_sha256` holds the digest of the float weight it was made from (`weight_digest`), so a checkpoint finds
its layers in a graph whatever the graph calls them (checkpoint.Checkpoint.match).

Saving, loading and matching records to a model live in checkpoint.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import formats, hadamard
from ..kernels import reference
from ..kernels.specs import E8P_LINEAR, FP4_LINEAR, ROTATED_LINEAR, Shared
from .incoherence import Transform


@dataclass
class QuantizedLinear:
    kind: ClassVar[str] = "int"
    TENSORS: ClassVar[tuple[str, ...]] = ("qweight", "scales", "su", "sv", "bias")
    FIELDS: ClassVar[tuple[str, ...]] = ("method", "bits", "in_features", "out_features", "group_size", "seed",
                                         "weight_error", "proxy_loss", "weight_sha256")

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
    weight_sha256: str | None = None  # weight_digest of the float weight it was made from (matching a model)
    # float32 (out_features,): the layer's bias as bias correction set it (recipe.LayerSpec.bias_correct), which
    # every consumer applies instead of the model's bias; None: the model's own bias (or none)
    bias: torch.Tensor | None = None

    OP: ClassVar = ROTATED_LINEAR  # the reference op that runs it (nn.LowbitLinear, passes/rewrite_linears)

    @property
    def fmt(self) -> str:
        return f"int{self.bits}"

    def op_arguments(self) -> dict:
        """The arguments of OP but x and bias, by name."""
        return {"qweight": self.qweight, "scales": self.scales, "su": self.su, "sv": self.sv,
                "had_in": _factor(self.in_features) if self.su is not None else None,
                "had_out": _factor(self.out_features) if self.sv is not None else None,
                "bits": self.bits, "in_features": self.in_features, "group_size": self.group_size}

    def input_rotation(self):
        """(signs, factor) of a rotation applied to x before OP, outside it; None (OP rotates itself)."""
        return None

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

    def native_digits(self) -> tuple[torch.Tensor, int, float, torch.Tensor]:
        """The codes for the native integer kernel (kernels/cpu_native.py): (codes uint8 (out, in), bits, the grid's
        zero, float32 scales (out, groups))."""
        codes = formats.unpack(self.qweight, self.bits, self.in_features).to(torch.uint8)
        return codes, self.bits, formats.int_format(self.bits).zero, self.scales.to(torch.float32)

    def bits_per_weight(self) -> float:
        """Codes + float16 scales + one bit per sign, as stored."""
        sign_bits = (0 if self.su is None else self.in_features) + (0 if self.sv is None else self.out_features)
        return formats.bits_per_weight(formats.int_format(self.bits), self.in_features, self.out_features,
                                       self.group_size, sign_bits)


@dataclass
class FP4QuantizedLinear:
    """One LLM-FP4 linear: y = Q_a(x ⊙ 2**k) · Ŵ'ᵀ + bias, Ŵ' = decode(codes) ⊙ w_scales (per row).

    Tensors as `lowbit::fp4_linear` takes them (kernels/fp4_ops.py): qweight uint8 (out, ceil(in / 2)),
    w_scales float16 (out, 1), act_scale float16 (1,) or None (W4A16), act_exponents uint8 (in,) or None (no
    channel shifted). The codes are those of W' = W·2**-k, so `dequantized_weight()` multiplies the columns
    back by 2**k. A graph pass may fold the 2**k into the producer of the input (passes/fold_act_scales.py);
    the record always keeps k, so every consumer can fold or apply it.
    """

    kind: ClassVar[str] = "fp4"
    TENSORS: ClassVar[tuple[str, ...]] = ("qweight", "w_scales", "act_scale", "act_exponents", "su")
    FIELDS: ClassVar[tuple[str, ...]] = ("method", "w_format", "a_format", "in_features", "out_features",
                                         "weight_error", "proxy_loss", "baseline_loss", "notes", "seed",
                                         "weight_sha256")

    fqn: str
    method: str  # "search" (LLM-FP4 search) | "max-scaled" (E2M1 at the max-scaled bias, the baseline)
    w_format: str  # "e2m1" | "e1m2" | "e3m0"
    a_format: str | None  # the activation format, None for W4A16
    in_features: int
    out_features: int
    qweight: torch.Tensor
    w_scales: torch.Tensor
    act_scale: torch.Tensor | None
    act_exponents: torch.Tensor | None
    weight_error: float  # ||Ŵ - W||_F / ||W||_F with Ŵ the effective weight
    proxy_loss: float | None = None  # mean squared layer-output error on the calibration sample
    baseline_loss: float | None = None  # the same for max-scaled E2M1 (the unsearched quantizer)
    notes: list = field(default_factory=list)
    # rotated variant (recipe fp4-rot): the input is rotated by V = F·diag(su) (lowbit::hadamard) before the op,
    # and the codes are those of W Vᵀ; su float32 ±1 (in,) from `seed`. None: no rotation.
    su: torch.Tensor | None = None
    seed: int | None = None
    weight_sha256: str | None = None  # weight_digest of the float weight it was made from (matching a model)

    bits: ClassVar[int] = 4
    OP: ClassVar = FP4_LINEAR  # the reference op that runs it, after input_rotation() where there is one

    def op_arguments(self) -> dict:
        """The arguments of OP but x and bias, by name."""
        return {"qweight": self.qweight, "w_scales": self.w_scales, "act_shift": self.act_exponents,
                "act_scale": self.act_scale, "w_format": self.w_format, "a_format": self.a_format,
                "in_features": self.in_features}

    def input_rotation(self):
        """(signs, factor) of the fp4-rot input rotation (lowbit::hadamard before OP, shared by the layers that
        read the same input), or None."""
        return None if self.su is None else (self.su, _factor(self.in_features))

    @property
    def fmt(self) -> str:
        return f"fp4 w:{self.w_format} a:{self.a_format or 'float'}" + (" rot" if self.su is not None else "")

    @property
    def rotated(self) -> bool:
        return self.su is not None

    def shifted_weight(self) -> torch.Tensor:
        """Ŵ' float32 (out, in): decoded codes times row scales, in the shifted (and rotated) coordinates the
        op uses."""
        from ..kernels.fp4_ops import dequantize_fp4_weight

        return dequantize_fp4_weight(self.qweight, self.w_scales, self.w_format, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """Ŵ'·2**k (columns), un-rotated, float32: the weight applied to the original inputs (activation
        rounding aside)."""
        from ..formats.fp4 import exponent_multipliers

        w = self.shifted_weight()
        if self.act_exponents is not None:
            w = w * exponent_multipliers(self.act_exponents)
        if self.su is not None:
            w = hadamard.apply(w, self.su, hadamard.factor(self.in_features), inverse=True).contiguous()
        return w

    def forward_reference(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """What the ops compute, in plain torch (rotation and activation quantization included)."""
        from ..kernels.fp4_ops import fp4_linear_ref

        if self.su is not None:
            x = reference.hadamard_ref(x, self.su, hadamard.factor(self.in_features))
        return fp4_linear_ref(x, self.qweight, self.w_scales, self.act_exponents, self.act_scale,
                              self.w_format, self.a_format, bias, self.in_features)

    def bits_per_weight(self) -> float:
        """Packed codes + float16 row scales + the float16 activation scale + uint8 exponents + one bit per
        rotation sign, as stored."""
        total = 8 * self.qweight.numel() + 16 * self.w_scales.numel()
        total += 0 if self.act_scale is None else 16 * self.act_scale.numel()
        total += 0 if self.act_exponents is None else 8 * self.act_exponents.numel()
        total += 0 if self.su is None else self.in_features
        return total / (self.in_features * self.out_features)


@dataclass
class E8QuantizedLinear(QuantizedLinear):
    """One E8 lattice-codebook linear (method "e8", QuIP#'s E8P: formats/e8p.py, quantize/e8.py): the fields of
    QuantizedLinear, with E8 codes.

    qweight uint8 (out_features, in_features / 8 · bits): per row, one little-endian integer of `bits` bytes per 8
    weights (e8p.pack_codes); scales float16 (out_features, 1); group_size 0. The rotated weight is
    Ŵ' = scales ⊙ E8Format(bits).dequantize(codes) and the layer y = Uᵀ Ŵ' V x, as for a rotated QuantizedLinear
    (`lowbit::e8p_linear`). su / sv are ±1 from `seed`, or real-valued where block fine-tuning moved them
    (quantize/finetune.py). It subclasses QuantizedLinear so that the modules built from records (nn.swap_linears)
    take it; code that reads integer codes must check `kind == "int"`.
    """

    kind: ClassVar[str] = "e8"
    OP: ClassVar = E8P_LINEAR

    @property
    def fmt(self) -> str:
        return f"e8p{self.bits}"

    @property
    def e8_format(self):
        from ..formats import e8p

        return e8p.e8_format(self.bits)

    def op_arguments(self) -> dict:
        """The arguments of OP but x and bias, by name."""
        return {"qweight": self.qweight, "scales": self.scales, "su": self.su, "sv": self.sv,
                "had_in": _factor(self.in_features) if self.su is not None else None,
                "had_out": _factor(self.out_features) if self.sv is not None else None,
                "bits": self.bits, "in_features": self.in_features}

    def codes(self) -> torch.Tensor:
        """int32 (out_features, in_features / 8, stages)."""
        from ..formats import e8p

        return e8p.unpack_codes(self.qweight, self.e8_format)

    def rotated_weight(self) -> torch.Tensor:
        from ..kernels.e8_ops import dequantize_e8_weight

        return dequantize_e8_weight(self.qweight, self.scales, self.bits, self.in_features)

    def native_digits(self) -> tuple[torch.Tensor, int, float, torch.Tensor]:
        """The codes as 4-bit integer digits, one block of out_features rows per stage whose products add up
        (e8p.int4_digits): (digits uint8 (stages·out, in), 4, zero 7.5, float32 scales (stages·out, 1))."""
        from ..formats import e8p

        digits = e8p.int4_digits(self.codes(), self.e8_format).reshape(-1, self.in_features)
        mult = torch.tensor(e8p.DIGIT_MULTIPLIERS[self.bits], dtype=torch.float32)
        scales = (mult.view(-1, 1, 1) * self.scales.to(torch.float32)).reshape(-1, 1)
        return digits, 4, e8p.DIGIT_ZERO, scales

    def bits_per_weight(self) -> float:
        """Codes + float16 row scales + one bit per sign (16 per entry of a sign vector that fine-tuning made
        real-valued), as stored."""
        total = 8 * self.qweight.numel() + 16 * self.scales.numel()
        for v in (self.su, self.sv):
            total += 0 if v is None else v.numel() * (1 if bool((v.abs() == 1).all()) else 16)
        return total / (self.in_features * self.out_features)


RECORD_KINDS = {cls.kind: cls for cls in (QuantizedLinear, FP4QuantizedLinear, E8QuantizedLinear)}


def _factor(n: int) -> Shared:
    """The dense Hadamard factor of size n (None for a power of two), one per graph."""
    return Shared(f"had_{n}", hadamard.factor(n))




def weight_digest(w: torch.Tensor) -> str:
    """sha256 of a float weight as float32 (shape included): what a record stores to be matched to its layer."""
    from ..io import fingerprint

    return fingerprint(w.detach().to(torch.float32))
