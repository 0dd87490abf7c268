"""Models of the book and access to their intermediate features (Chapter 1)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .features import FeatureTap, conv_layers, last_stage_blocks, residual_blocks, unwrap
from .resnet import ResNet18
from .wrn import WideResNet

# name -> builder(num_classes, in_channels, width); the configuration's ``model`` knob takes its names from here
BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "resnet18": lambda classes, channels, width: ResNet18(num_classes=classes, in_channels=channels, width=width),
    "wrn-28-10": lambda classes, channels, width: WideResNet(num_classes=classes, in_channels=channels, depth=28,
                                                             widen=10),
}
MODELS = tuple(BUILDERS)


def build_model(name: str, *, num_classes: int, in_channels: int, width: int = 64) -> nn.Module:
    """Construct a model by name: ``resnet18`` (``width`` = first-stage channels) or ``wrn-28-10``."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return BUILDERS[name](num_classes, in_channels, width)


__all__ = ["BUILDERS", "FeatureTap", "MODELS", "ResNet18", "WideResNet", "build_model", "conv_layers",
           "last_stage_blocks", "residual_blocks", "unwrap"]
