"""Training utilities beside the layers: `checkpoint` recomputes a function's activations in
backward instead of keeping them (gradient checkpointing)."""

from narun.utils.recompute import checkpoint

__all__ = ["checkpoint"]
