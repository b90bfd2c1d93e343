"""megalite: a Megatron-style 3D-parallel LLM training codebase."""

__version__ = "0.1.0"

# The Python API (DESIGN.md contract 6), imported on first use so `import megalite` stays light.
_LAZY = {"generate": "megalite.generation", "load_model": "megalite.generation", "Generation": "megalite.generation"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megalite' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
