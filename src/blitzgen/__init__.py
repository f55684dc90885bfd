"""blitzgen: fast batch-1 LLM inference in pure PyTorch."""

__version__ = "0.1.0"
