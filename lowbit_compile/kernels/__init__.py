"""torch.library ops in the `lowbit` namespace. Importing this module registers them."""

from . import cpu, cpu_fp4, e8_ops, embedding, fp4_ops, ops  # noqa: F401  (registers lowbit::*)
from .fp4_ops import fp4_linear
from .ops import hadamard, rotated_linear

__all__ = ["fp4_linear", "hadamard", "rotated_linear"]
