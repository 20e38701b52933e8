"""alignment_callback: permutation-calibrated representational alignment for PyTorch."""

__version__ = "0.1.0"
