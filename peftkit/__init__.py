"""peftkit: parameter-efficient fine-tuning, measured side by side on your task."""

import os

# Idle OpenMP threads sleep instead of spinning. On a busy or shared CPU, spinning threads
# steal the cores the working ones need (MiniLM training step ~5x faster on a loaded
# 2-core machine). Effective only if set before torch loads; set the variable to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# The Python API is peftkit.api (``from peftkit import api``). load_recipe and train are also
# here; compare/estimate/export/predict/report are not: those names are peftkit's submodules.
# Loaded lazily, so ``import peftkit`` (and the CLI's start) stays free of torch.
__all__ = ["api", "load_recipe", "train"]


def __getattr__(name):
    if name in __all__:
        import importlib

        api = importlib.import_module("peftkit.api")
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
