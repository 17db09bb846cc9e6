"""Recipes: what format each linear gets. Frozen, validated, parsed from short strings.

A recipe string names the default layer spec: ``w{bits}[-{method}][-g{group}][-ft]``
    w4          int4, randomized-Hadamard incoherence + RTN with a clipping search (data-free)
    w4-rtn      int4, plain RTN without incoherence (baseline)
    w4-g128     as w4, one scale per 128 inputs instead of per output channel
    w2-quip     int2, QuIP: incoherence + LDLQ on calibration Hessians (needs calibration data)
    w2-optq     int2, OPTQ/GPTQ: LDLQ without incoherence (baseline, needs calibration data)
    w2-e8       E8P: incoherence + block LDLQ with QuIP#'s E8 lattice codebook, 8 weights per 16-bit code (needs
                calibration data; 2, 3 or 4 bits; registered by quantize/layer.py); after each block, the
                quantized linears' biases are set so that their mean outputs on the calibration data are the float
                model's (bias correction; linears without a bias are left as they are)
    w2-e8-ft    as w2-e8, but each transformer block is quantized group by group (the linears that read one input),
                fine-tuning after each group the quantized linears' continuous parameters and the float weights of
                those still to come to the float model's block outputs (QuIP#; quantize/finetune.py); -ft applies to
                methods registered as tunable
and the LLM-FP4 recipes (both need calibration data: the search runs on a sample of each layer's inputs)
    fp4         W4A4: FP4 weights (format and per-row bias searched) and FP4 activations (format and one
                per-tensor bias searched, per-channel power-of-two exponents folded into the producer)
    w4a16-fp4   FP4 weights as above, activations left in float
    fp4-rot     W4A4 as fp4, but the layer input goes through a seeded randomized Hadamard rotation first
                (one per group of layers reading the same input) instead of per-channel exponents
and the mixed-precision recipes (need calibration data: every layer is measured at every candidate format)
    2.5bpw      a plan from the budget solver (mixed.py): each linear gets one of the candidate formats
                (default w2-quip, w3-quip, w4-quip) so that the average stored bits per weight, scales and
                sign vectors included, is at most 2.5; "3.25bpw+fp4" adds W4A16 FP4 to the candidates
Per-layer overrides are an ordered map (torchao's FqnToConfig order): an exact module FQN wins, then the
first matching ``re:`` pattern, then ``_default``; a value of None keeps that layer in float.
By default output heads (``lm_head``) stay in float, as in GPTQ/QuIP practice; override to change it.
Token embeddings (nn.Embedding) are quantized only when an override names them, with an unrotated integer
recipe (a gathered row cannot be un-rotated): e.g. {"model.embed_tokens": "w4-rtn-g32"}; a tied output head then
shares the quantized table.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import LowbitError
from .formats import PACKABLE_BITS


@dataclass(frozen=True)
class Method:
    """A quantization method a recipe string can name (w{bits}-{method})."""

    description: str
    rotate: bool  # randomized-Hadamard incoherence by default
    needs_calibration: bool
    bits: tuple[int, ...] = PACKABLE_BITS  # the widths it quantizes to
    grouped: bool = True  # takes group-wise scales (-g<N>)
    tunable: bool = False  # takes -ft: block fine-tuning after quantization (quantize/finetune.py)
    bias_correct: bool = False  # its recipes (but -ft) correct the linears' biases after each block (finetune.py)
    fmt: str = "int{bits}"  # the format's name in reports


# method name -> Method; "" is the bare w{bits}. quantize/ adds its own methods with `register_method`.
METHODS: dict[str, Method] = {
    "": Method("randomized-Hadamard incoherence + RTN with clipping search (data-free)", True, False),
    "rtn": Method("plain round-to-nearest with clipping search, no incoherence (baseline)", False, False),
    "quip": Method("QuIP: incoherence + LDLQ adaptive rounding on calibration Hessians", True, True),
    "optq": Method("OPTQ/GPTQ: LDLQ on calibration Hessians without incoherence (baseline)", False, True),
}
CALIBRATED = ("fp4",)  # methods outside METHODS (named recipes) that need calibration data


def register_method(name: str, description: str, *, rotate: bool, needs_calibration: bool, **options) -> None:
    """Make `w{bits}-{name}` a recipe (the quantizer that implements it registers it, see quantize/layer.py);
    `options` are Method's other fields (bits, grouped, tunable, bias_correct, fmt)."""
    if not re.fullmatch(r"[a-z][a-z0-9]*", name) or name == "ft" or re.fullmatch(r"g\d+", name):
        raise LowbitError(f"method name {name!r}: use lowercase letters and digits (not 'ft' or g<N>)")
    METHODS[name] = Method(description, rotate, needs_calibration, **options)

DEFAULT_FLOAT_PATTERNS = (r"re:(^|.*\.)lm_head$",)

# Named FP4 recipes -> LayerSpec keyword arguments (method "fp4"; see LayerSpec's FP4 fields).
FP4_RECIPES = {
    "fp4": {"act_quant": True},
    "w4a16-fp4": {"act_quant": False},
    "fp4-rot": {"act_quant": True, "rotate": True, "act_exponents": False},
}


@dataclass(frozen=True)
class LayerSpec:
    """How one linear is quantized."""

    bits: int = 4
    method: str = "rtn"
    rotate: bool = True
    group_size: int = 0  # 0: one scale per output channel
    # LDLQ methods only: QuIP's greedy coordinate-descent passes, diagonal rescaling, Hessian damping
    greedy: int = 0
    rescale: bool = False
    damp: float = 0.01
    # method "fp4" only (LLM-FP4): quantize activations too (W4A4; False is W4A16), search formats and
    # clipping (False: max-scaled E2M1, the unsearched baseline), per-channel activation exponents
    act_quant: bool = True
    fp4_search: bool = True
    act_exponents: bool = True
    # tunable methods only (-ft): fine-tune each block's continuous parameters after quantizing it
    finetune: bool = False
    # after each block is quantized, give each quantized linear that has a bias the bias that makes its mean output
    # on the calibration data the float model's (quantize/finetune.py, BlockTuner; stored in the record)
    bias_correct: bool = False

    def __post_init__(self):
        method = METHODS.get(self.method)
        if self.bias_correct and not (method and method.needs_calibration):
            raise LowbitError(f"bias correction needs a calibrated LDLQ method (quip, optq, e8), not {self.method!r}")
        if self.finetune and not (method and method.tunable):
            tunable = [m for m, v in METHODS.items() if v.tunable]
            raise LowbitError(f"fine-tuning (-ft) is implemented for the methods {tunable}, not {self.method!r}")
        if self.method == "fp4":
            if self.bits != 4 or self.group_size:
                raise LowbitError(f"FP4 layers are 4-bit with one scale per output row; got bits={self.bits}, "
                                  f"group_size={self.group_size}")
            return
        if self.bits not in PACKABLE_BITS:
            raise LowbitError(f"{self.bits}-bit weights are not supported; valid bit widths: {PACKABLE_BITS}")
        if method is not None and self.bits not in method.bits:
            raise LowbitError(f"method {self.method!r} quantizes to {method.bits} bits per weight, not {self.bits}")
        if self.group_size < 0:
            raise LowbitError(f"group_size must be 0 (per channel) or positive, got {self.group_size}")
        if self.group_size and method is not None and not method.grouped:
            raise LowbitError(f"method {self.method!r} has one scale per output row; group_size must be 0, got "
                              f"{self.group_size}")

    @property
    def fmt(self) -> str:
        if self.method == "fp4":
            return "fp4"
        return METHODS[self.method].fmt.format(bits=self.bits) if self.method in METHODS else f"int{self.bits}"

    @property
    def needs_calibration(self) -> bool:
        return self.method in CALIBRATED or self.needs_hessian

    @property
    def needs_hessian(self) -> bool:
        """Whether quantizing needs the calibration Hessian (LDLQ methods); FP4 needs a sample and maxima only."""
        return self.method in METHODS and METHODS[self.method].needs_calibration

    def describe(self) -> str:
        if self.method == "fp4":
            how = ("searched" if self.fp4_search else "max-scaled e2m1") + (" + rotation" if self.rotate else "")
            if not self.act_quant:
                return f"fp4 w4a16 {how}"
            return f"fp4 w4a4 {how}" + (" + act. exponents" if self.act_exponents and self.fp4_search else "")
        g = f", group {self.group_size}" if self.group_size else ""
        inc = " + incoherence" if self.rotate and self.method == "rtn" else ""
        return (f"{self.fmt} {self.method}{inc}{g}" + (" + fine-tuning" if self.finetune else "")
                + (" + bias correction" if self.bias_correct else ""))


_BPW_RE = re.compile(r"^(?P<bpw>\d+(?:\.\d+)?)bpw(?P<fp4>\+fp4)?$")
DEFAULT_CANDIDATES = ("w2-quip", "w3-quip", "w4-quip")
MIXED_UNITS = ("linear", "group", "block")
# method names are never g<N> or ft (register_method refuses them), so those suffixes are not read as one
_SPEC_RE = re.compile(r"^w(?P<bits>\d+)(?:-(?!(?:g\d+|ft)(?:-|$))(?P<method>[a-z][a-z0-9]*))?"
                      r"(?:-g(?P<group>\d+))?(?P<ft>-ft)?$")


def valid_recipe_names() -> list[str]:
    out = []
    for b in PACKABLE_BITS:
        for m, method in METHODS.items():
            if b in method.bits:
                out.append(f"w{b}" + (f"-{m}" if m else ""))
                out += [f"w{b}-{m}-ft"] if method.tunable else []
    return out + list(FP4_RECIPES)


def parse_spec(text: str) -> LayerSpec:
    if isinstance(text, str) and text.strip().lower() in FP4_RECIPES:
        return LayerSpec(**{"bits": 4, "method": "fp4", "rotate": False, **FP4_RECIPES[text.strip().lower()]})
    m = _SPEC_RE.match(text.strip().lower()) if isinstance(text, str) else None
    if not m or (m["method"] or "") not in METHODS or int(m["bits"]) not in PACKABLE_BITS:
        raise LowbitError(
            f"unknown recipe {text!r}; valid recipes: {', '.join(valid_recipe_names())} "
            f"(append -g<N> for group-wise scales, e.g. w4-g128; a mixed-precision budget is <bits>bpw, e.g. "
            f"2.5bpw or 3.25bpw+fp4)"
        )
    method = m["method"] or ""
    rotate = METHODS[method].rotate
    return LayerSpec(bits=int(m["bits"]), method=method or "rtn", rotate=rotate,
                     group_size=int(m["group"] or 0), finetune=bool(m["ft"]),
                     bias_correct=METHODS[method].bias_correct and not m["ft"])


def _as_spec(value) -> LayerSpec | None:
    if value is None or isinstance(value, LayerSpec):
        return value
    return parse_spec(value)


@dataclass(frozen=True)
class Recipe:
    name: str
    default: LayerSpec | None
    overrides: tuple[tuple[str, LayerSpec | None], ...] = field(default=())
    seed: int = 0
    # mixed precision ("2.5bpw"): the average stored bits per weight the plan may use, the candidate formats
    # (recipe strings) and the unit the solver assigns one format to ("linear", "group" or "block").
    # Overrides then pin layers (to a format, or None for float) instead of setting their spec.
    target_bpw: float | None = None
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    unit: str = "linear"

    def __post_init__(self):
        if self.target_bpw is not None:
            if not (isinstance(self.target_bpw, (int, float)) and 1.0 <= self.target_bpw <= 16.0):
                raise LowbitError(f"target bits per weight must be a number in [1, 16], got {self.target_bpw!r}")
            if self.unit not in MIXED_UNITS:
                raise LowbitError(f"mixed-precision unit {self.unit!r}: valid units are {MIXED_UNITS}")
            if not self.candidates:
                raise LowbitError(f"a mixed-precision recipe needs candidate formats, e.g. {DEFAULT_CANDIDATES}")
            for c in self.candidates:
                parse_spec(c)
        for key, _ in self.overrides:
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as e:
                    raise LowbitError(f"override pattern {key!r} is not a valid regular expression: {e}") from None

    @classmethod
    def mixed(cls, target_bpw: float, candidates=DEFAULT_CANDIDATES, unit: str = "linear", seed: int = 0,
              overrides: Mapping[str, object] | None = None) -> Recipe:
        """A mixed-precision recipe: the solver picks one of `candidates` per unit for `target_bpw`."""
        base = cls(name=f"{target_bpw:g}bpw", default=None, seed=seed, target_bpw=float(target_bpw),
                   candidates=tuple(candidates), unit=unit)
        return cls.parse(base, overrides, seed)

    @classmethod
    def parse(cls, recipe, overrides: Mapping[str, object] | None = None, seed: int = 0) -> Recipe:
        if isinstance(recipe, Recipe):
            base = recipe
        elif isinstance(recipe, str) and (m := _BPW_RE.match(recipe.strip().lower())):
            cands = DEFAULT_CANDIDATES + (("w4a16-fp4",) if m["fp4"] else ())
            base = cls(name=recipe.strip().lower(), default=None, seed=seed, target_bpw=float(m["bpw"]),
                       candidates=cands)
        elif isinstance(recipe, str):
            base = cls(name=recipe, default=parse_spec(recipe), seed=seed)
        else:
            raise LowbitError(f"recipe must be a string like 'w4' or a Recipe, got {type(recipe).__name__}")
        if not overrides:
            return base
        items = [(str(k), _as_spec(v)) for k, v in overrides.items()]
        default = base.default
        items_wo_default = []
        for k, v in items:
            if k == "_default":
                default = v
            else:
                items_wo_default.append((k, v))
        if base.target_bpw is not None and default is not None:
            raise LowbitError(f"recipe {base.name!r} is a mixed-precision budget: '_default' cannot set a format "
                              f"for every layer; pin single layers or patterns instead")
        return dataclasses.replace(base, default=default, overrides=tuple(items_wo_default) + base.overrides,
                                   seed=base.seed if isinstance(recipe, Recipe) else seed)

    def spec_for(self, fqn: str) -> tuple[LayerSpec | None, str]:
        """(spec or None for float, why): exact name, then patterns in order, then the built-in float
        patterns, then the default."""
        if self.target_bpw is not None:
            raise LowbitError(f"recipe {self.name!r} is a mixed-precision budget without a plan yet: make the plan "
                              f"with lb.quantize(model, {self.name!r}, calibration) and use the checkpoint it "
                              f"returns (torch.compile option checkpoint=...)")
        for key, spec in self.overrides:
            if key == fqn:
                return spec, f"override {key!r}"
        for key, spec in self.overrides:
            if key.startswith("re:") and re.fullmatch(key[3:], fqn):
                return spec, f"override {key!r}"
        for key in DEFAULT_FLOAT_PATTERNS:
            if re.fullmatch(key[3:], fqn):
                return None, "output head kept in float by default (override its name to quantize it)"
        return self.default, "recipe default"

    def override_for(self, fqn: str) -> tuple[bool, LayerSpec | None, str]:
        """(named, spec, why) from the overrides alone (exact name, then patterns), no default: what decides an
        embedding, which is quantized only when an override names it."""
        for key, spec in self.overrides:
            if key == fqn:
                return True, spec, f"override {key!r}"
        for key, spec in self.overrides:
            if key.startswith("re:") and re.fullmatch(key[3:], fqn):
                return True, spec, f"override {key!r}"
        return False, None, ""

    def needs_hessian(self, fqn: str) -> bool:
        """Whether calibration must collect the Hessian of this linear's input (always, for a budget recipe)."""
        if self.target_bpw is not None:
            return True
        spec, _ = self.spec_for(fqn)
        return spec is not None and spec.needs_hessian

    @property
    def needs_calibration(self) -> bool:
        if self.target_bpw is not None:
            return True
        specs = [self.default] + [s for _, s in self.overrides]
        return any(s is not None and s.needs_calibration for s in specs)
