"""Tensor layout: plans of a checkpoint's output tensors (expert layout, dtype, dequantization)."""
