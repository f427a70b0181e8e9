"""ATSS object detection in JAX: adaptive training sample selection, fixed shapes, data parallel."""

from atss_jax import xla_flags

xla_flags.configure()  # before any module starts JAX's backend
