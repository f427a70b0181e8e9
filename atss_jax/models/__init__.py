"""The ATSS detector: ResNet backbone, FPN, shared head (Flax Linen)."""
