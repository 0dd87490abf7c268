"""Reading intermediate features by layer name, without copying the model.

Clustering accuracy (Chapter 2), the feature shift of ILA vs OLA (Chapter 4) and SAT's two terms
(Eq. 7-10, Chapter 5) all need ``f^l(x)`` for chosen layers ``l`` from the same forward pass that
gives the logits. Forward hooks do exactly that: ``with FeatureTap(model, names) as tap`` records the
output of each named module (or, as ``"name:input"``, its input) during every forward pass inside the block.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and torch.compile wrappers (layer names unchanged)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def conv_layers(model: nn.Module, *, include_shortcuts: bool = False) -> list[str]:
    """Names of the model's conv layers in forward order (the x-axis of the paper's Figure 2).

    1x1 shortcut projections are left out unless ``include_shortcuts``: they are side branches,
    not steps of the main path.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
             and (include_shortcuts or "shortcut" not in n)]
    return _in_forward_order(model, names)


def residual_blocks(model: nn.Module) -> list[str]:
    """Names of the residual blocks in forward order, e.g. ``layer1.0`` ... ``layer4.1`` for ResNet-18."""
    from .resnet import BasicBlock
    from .wrn import WideBlock
    names = [n for n, m in model.named_modules() if isinstance(m, (BasicBlock, WideBlock))]
    return _in_forward_order(model, names)


def last_stage_blocks(model: nn.Module) -> list[str]:
    """The residual blocks of the last stage: SAT's default layers (``layer4.0``, ``layer4.1``; Chapter 5)."""
    blocks = residual_blocks(model)
    stage = blocks[-1].rsplit(".", 1)[0]
    return [b for b in blocks if b.rsplit(".", 1)[0] == stage]


def _in_forward_order(model: nn.Module, names: list[str]) -> list[str]:
    """Sort module names by when their forward runs (module registration order can differ)."""
    order: list[str] = []
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: order.append(n)) for n in names]
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            param = next(model.parameters())
            model(torch.zeros(1, first.in_channels, 32, 32, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    seen = list(OrderedDict.fromkeys(order))
    return seen


INPUT_SUFFIX = ":input"


class FeatureTap:
    """Context manager recording the outputs of named modules during forward passes.

    >>> with FeatureTap(model, ["layer4.0", "layer4.1"]) as tap:
    ...     logits = model(x)
    ...     h = tap["layer4.1"]          # [B, C, H, W], part of the autograd graph

    A name ending in ``:input`` records the module's (first) *input* instead, with a forward
    pre-hook: ``"linear:input"`` is the feature vector the last linear layer reads (h of
    Theorem 2, Chapter 6). Each forward pass overwrites the stored tensors; ``tap.features`` is the
    name -> tensor dict.
    """

    def __init__(self, model: nn.Module, names: list[str] | tuple[str, ...]):
        model = unwrap(model)
        modules = dict(model.named_modules())
        unknown = [n for n in names if n.removesuffix(INPUT_SUFFIX) not in modules]
        if unknown:
            raise KeyError(f"unknown layer name(s) {unknown}; see satlib.models.conv_layers(model) "
                           "and residual_blocks(model) for valid names (a suffix ':input' taps a module's input)")
        self.names = list(names)
        self._modules = [modules[n.removesuffix(INPUT_SUFFIX)] for n in self.names]
        self._handles: list = []
        self.features: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "FeatureTap":
        for name, module in zip(self.names, self._modules):
            if name.endswith(INPUT_SUFFIX):
                self._handles.append(module.register_forward_pre_hook(self._input_recorder(name)))
            else:
                self._handles.append(module.register_forward_hook(self._recorder(name)))
        return self

    def _recorder(self, name: str):
        def hook(module, inputs, output):
            self.features[name] = output
        return hook

    def _input_recorder(self, name: str):
        def hook(module, inputs):
            self.features[name] = inputs[0]
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.features:
            raise KeyError(f"layer {name!r} recorded nothing: no forward pass of the model ran inside this tap "
                           "(a torch.compile'd model can skip hooks added after its first call; tap and call "
                           "the uncompiled model)")
        return self.features[name]

    def flat(self, name: str) -> torch.Tensor:
        """Features of one layer flattened to [B, d_l]."""
        return self[name].flatten(1)
