"""facems: face-embedding training with the Multi-Similarity loss."""

__version__ = "0.1.0"
