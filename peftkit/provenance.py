"""Provenance of a result: package versions, Python, device, threads and the git sha."""

from __future__ import annotations

import os
import platform
import subprocess

import torch

PACKAGES = ("peftkit", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes")


def _git_sha() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "versions": versions,
        "python": platform.python_version(),
        "device": dev,
        "device_name": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_sha": _git_sha(),
    }
