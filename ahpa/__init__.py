"""AHPA: Adaptive Hierarchical Prior Alignment for diffusion transformers."""

__version__ = "0.3.0"
