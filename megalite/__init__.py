"""megalite: a Megatron-style 3D-parallel LLM training codebase."""

__version__ = "0.1.0"
