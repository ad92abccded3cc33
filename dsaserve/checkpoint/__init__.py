"""Checkpoints: the loader contract (``TensorSpec``), safetensors reading with fp8 dequantization and
per-rank slicing (``load_checkpoint``), and the tiny random checkpoint maker (``tiny``, not imported here)."""

from dsaserve.checkpoint.loader import CheckpointError, CheckpointFiles, load_checkpoint, read_tensor
from dsaserve.checkpoint.spec import TensorSpec

__all__ = ["CheckpointError", "CheckpointFiles", "TensorSpec", "load_checkpoint", "read_tensor"]
