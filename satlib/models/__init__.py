"""Models of the book and access to their intermediate features (Chapter 1)."""
from __future__ import annotations

from torch import nn

from .features import FeatureTap, conv_layers, last_stage_blocks, residual_blocks, unwrap
from .resnet import ResNet18
from .wrn import WideResNet

MODELS = ("resnet18", "wrn-28-10")


def build_model(name: str, *, num_classes: int, in_channels: int, width: int = 64) -> nn.Module:
    """Construct a model by name: ``resnet18`` (``width`` = first-stage channels) or ``wrn-28-10``."""
    if name == "resnet18":
        return ResNet18(num_classes=num_classes, in_channels=in_channels, width=width)
    if name == "wrn-28-10":
        return WideResNet(num_classes=num_classes, in_channels=in_channels, depth=28, widen=10)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


__all__ = ["FeatureTap", "MODELS", "ResNet18", "WideResNet", "build_model", "conv_layers",
           "last_stage_blocks", "residual_blocks", "unwrap"]
