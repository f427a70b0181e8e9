"""ATSS object detection in JAX: adaptive training sample selection, fixed shapes, data parallel."""
