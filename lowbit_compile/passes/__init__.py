"""Graph passes, one per file. The order they run in is written out here, in one place."""

from .base import PassBase, PassResult
from .find_linears import FindLinears, LinearSite, linear_sites
from .rewrite_linears import RewriteLinears, count_quantized

# The backend's pipeline, in order: analysis first, then the rewrite that consumes its tags.
PIPELINE = (FindLinears, RewriteLinears)

__all__ = ["PassBase", "PassResult", "FindLinears", "LinearSite", "linear_sites", "RewriteLinears",
           "count_quantized", "PIPELINE"]
