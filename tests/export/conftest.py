"""Fixtures shared by the export tests."""

import pytest


@pytest.fixture(scope="module")
def llama_fp4_checkpoint():
    """A 1-layer tiny Llama with every FP4 recipe (test_decompose and test_executorch)."""
    from pte_support import LLAMA_FP4_OVERRIDES, short_fp4_search, token_batches
    from tinymodels import tiny_llama

    import lowbit_compile as lb

    model = tiny_llama(layers=1)
    with short_fp4_search():
        ck = lb.quantize(model, "fp4", token_batches(), overrides=LLAMA_FP4_OVERRIDES, progress=False)
    return model, ck
