"""peftkit: parameter-efficient fine-tuning, measured side by side on your task."""

import os

# Idle OpenMP threads sleep instead of spinning. On a busy or shared CPU, spinning threads
# steal the cores the working ones need (MiniLM training step ~5x faster on a loaded
# 2-core machine). Effective only if set before torch loads; set the variable to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
