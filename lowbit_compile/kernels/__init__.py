"""torch.library ops in the `lowbit` namespace. Importing this module registers them."""

from . import ops  # noqa: F401  (registers lowbit::*)
from .ops import hadamard, rotated_linear

__all__ = ["hadamard", "rotated_linear"]
