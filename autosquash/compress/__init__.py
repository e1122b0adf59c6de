"""Compression operators (quantization, pruning, decomposition) and the plan that combines them."""
