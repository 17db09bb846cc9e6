"""lowbit-compile: 2/3/4-bit and FP4 weights for PyTorch 2 models, through torch.compile and export."""

from . import kernels, quiet  # noqa: F401  (registers the lowbit:: ops; drops known library noise: quiet.py)
from .backend import REPORTS, BackendSettings, reset
from .checkpoint import Checkpoint, FP4QuantizedLinear, QuantizedLinear
from .errors import LowbitError
from .export import export
from .nn import LowbitLinear, swap_linears
from .pipeline import quantize
from .recipe import LayerSpec, Recipe

__version__ = "0.1.0"


def last_report():
    """The report of the most recent graph the backend compiled (None before the first)."""
    return REPORTS[-1] if REPORTS else None


__all__ = ["BackendSettings", "Checkpoint", "FP4QuantizedLinear", "LayerSpec", "LowbitError", "LowbitLinear",
           "QuantizedLinear", "Recipe", "export", "last_report", "quantize", "reset", "swap_linears", "__version__"]
