"""Activation offloading (``train.activation_offloading``): what autograd saves in the forward
is copied to host memory at once and copied back when backward needs it.

With gradient checkpointing the saved tensors outside the checkpointed blocks are mostly
the blocks' inputs (``torch.utils.checkpoint`` saves them through these same hooks), so the
device keeps one block's recomputed activations at a time instead of one input per layer.
Without it every saved activation travels (large savings, slow steps).

Stays on the device: parameters and views of them (they are there anyway; a copy would
only add a second one in backward) and tensors under ``MIN_BYTES`` (not worth a transfer).
Copies run on the current stream, ordered with the compute (correct without
synchronisation, no overlap): simpler and slower than torchtune's two-stream version.

``simulated=True`` is the memory estimate's stand-in (``estimate.py``): the same choice of
tensors, but a packed tensor keeps only its shape, and unpacking allocates it anew, as the
copy back to the device does.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_BYTES = 2**20


def stays(t: torch.Tensor) -> bool:
    base = t if t._base is None else t._base
    return isinstance(base, nn.Parameter) or t.numel() * t.element_size() < MIN_BYTES


def hooks(simulated: bool = False):
    """The context manager to run the forward under."""
    pin = torch.cuda.is_available() and not simulated

    def pack(t):
        if stays(t):
            return t
        if simulated:
            return t.size(), t.dtype
        host = torch.empty(t.size(), dtype=t.dtype, pin_memory=pin)
        host.copy_(t, non_blocking=pin)
        return t.device, host

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if simulated:
            return torch.empty(packed[0], dtype=packed[1])
        device, host = packed
        return host.to(device, non_blocking=pin)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
