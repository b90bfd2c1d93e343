"""Generation: the KV-cache generator and sampling (`generate`), and inference models from
checkpoints (`load_model`). Used by `megalite generate`, evaluation and RL rollouts."""

from megalite.generation.generator import Generation, generate  # noqa: F401
from megalite.generation.loading import load_model  # noqa: F401
