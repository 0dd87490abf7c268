"""Numerical precision of the numbers the book reports (Chapter 1's GPU note).

Training may run in bf16 for speed; every accuracy, radius and clustering accuracy the book reports
is decided in fp32, whatever the device, so that a number read on a GPU equals the one read on a CPU.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def exact_fp32(device: torch.device):
    """Decide in true fp32: no autocast, and no TF32 in cuDNN convolutions or matmuls (restored after).

    Reported numbers must not depend on the device's precision; PyTorch lets cuDNN convolutions use
    TF32 (10-bit mantissa) on recent GPUs by default, so this also switches that off.
    """
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
