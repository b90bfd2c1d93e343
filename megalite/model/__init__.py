"""The Llama-family decoder, built from megalite.parallel layers."""

from megalite.model.llama import LlamaModel  # noqa: F401
