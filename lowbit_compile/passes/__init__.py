"""Graph passes, one per file. The order they run in is written out here, in one place.

The backend first tags the Dynamo graph's linears (FindLinears) and, when a recipe needs data and no checkpoint
is given, calibrates on the first call (InsertObservers, one run, remove_observers); once the layers are
quantized, the pass manager runs REWRITE_PASSES in order: the rewrite that consumes the tags (and the one of
quantized token embeddings), the folding of FP4
activation exponents into the producers of the rewritten linears' inputs, and (kernels="auto") the FP4 linears'
move onto the CPU int4 kernel.
"""

from .base import PassBase, PassResult, layer_meta
from .find_linears import FindLinears, LinearSite, linear_sites
from .fold_act_scales import FoldActScales
from .fp4_fast_path import FP4FastPath
from .insert_observers import InsertObservers, observed_stats, remove_observers
from .manager import PassContext, PassManager
from .rewrite_embeddings import RewriteEmbeddings, embedding_sites
from .rewrite_linears import RewriteLinears, count_quantized

REWRITE_PASSES = (RewriteLinears, RewriteEmbeddings, FoldActScales, FP4FastPath)
REWRITE = PassManager(REWRITE_PASSES)

__all__ = ["PassBase", "PassResult", "FindLinears", "FoldActScales", "FP4FastPath", "LinearSite", "linear_sites",
           "InsertObservers", "observed_stats", "remove_observers", "RewriteLinears", "count_quantized",
           "PassContext", "PassManager", "REWRITE_PASSES", "REWRITE", "layer_meta", "RewriteEmbeddings",
           "embedding_sites"]
