"""AHPA: Adaptive Hierarchical Prior Alignment for diffusion transformers."""

__version__ = "0.5.0"
