"""Graph passes, one per file. The order they run in is written out here, in one place."""

from .base import PassBase, PassResult
from .find_linears import FindLinears, LinearSite, linear_sites
from .fold_act_scales import FoldActScales
from .fp4_fast_path import FP4FastPath
from .insert_observers import InsertObservers, observed_stats, remove_observers
from .rewrite_linears import RewriteLinears, count_quantized

# The backend's pipeline, in order: analysis, (calibration observers when the recipe needs data and no
# checkpoint is given: inserted, run once, removed), the rewrite that consumes the tags, then folding of
# FP4 activation exponents into the producers of the rewritten linears' inputs, and (kernels="auto") the FP4
# linears' move onto the CPU int4 kernel.
PIPELINE = (FindLinears, InsertObservers, RewriteLinears, FoldActScales, FP4FastPath)

__all__ = ["PassBase", "PassResult", "FindLinears", "FoldActScales", "FP4FastPath", "LinearSite", "linear_sites",
           "InsertObservers", "observed_stats", "remove_observers", "RewriteLinears", "count_quantized", "PIPELINE"]
