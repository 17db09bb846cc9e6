"""Quantization algorithms on tensors, no graphs: rtn, incoherence (and quip, fp4, importance, allocate).

The per-layer entry point is `quantize.layer.quantize_weight`.
"""
