"""Graph passes, one per file. The order they run in is written out here, in one place."""

from .base import PassBase, PassResult
from .find_linears import FindLinears, LinearSite, linear_sites
from .insert_observers import InsertObservers, observed_stats, remove_observers
from .rewrite_linears import RewriteLinears, count_quantized

# The backend's pipeline, in order: analysis, (calibration observers when the recipe needs data and no
# checkpoint is given: inserted, run once, removed), then the rewrite that consumes the tags.
PIPELINE = (FindLinears, InsertObservers, RewriteLinears)

__all__ = ["PassBase", "PassResult", "FindLinears", "LinearSite", "linear_sites", "InsertObservers",
           "observed_stats", "remove_observers", "RewriteLinears", "count_quantized", "PIPELINE"]
