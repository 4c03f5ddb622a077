"""mmsafe: certifiably robust multi-modal learning in JAX/Flax (CRMT, ICLR 2024)."""

__version__ = "0.1.0"
