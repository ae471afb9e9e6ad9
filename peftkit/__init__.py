"""peftkit: parameter-efficient fine-tuning, measured side by side on your task."""

__version__ = "0.1.0"
