"""An upper bound on the Lipschitz constant of the feature map h, composed from per-layer rules (Chapter 6).

``lipschitz_bound`` walks the model's children in forward order (``nn.Sequential`` containers
expanded, up to the last linear layer) and multiplies one upper bound per operator: a conv directly
followed by an eval-mode BatchNorm is one linear map (the BN's per-channel scale folded into the
kernel), and every other operator's bound comes from the rule registered for its module type in
``LIPSCHITZ_RULES``. The book registers rules for ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU`` and
the residual blocks of its two models; a new architecture needs a rule for its block type
(``@lipschitz_rule(MyBlock)``), not a change here. The walk assumes what both models do: between
the children only 1-Lipschitz functions (ReLU) are applied, and the last child's output is averaged
over its spatial positions into h.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
import torch
from torch import nn

from ..attacks import attack_mode
from ..models.resnet import BasicBlock
from ..models.wrn import WideBlock
from .margin import last_linear
from .norms import conv_norm_dense, conv_norm_fft, conv_norm_power, first_layer_inf_to_2, norm_conversion

DENSE_LIMIT = 1 << 22       # most entries (outputs x inputs) of a conv matrix built for an exact norm (32 MB)


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode BatchNorm is x -> s * x + t per channel with s = gamma / sqrt(var + eps)."""
    if bn.running_var is None:
        raise ValueError("BatchNorm without running statistics has no fixed eval-mode scale")
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    return (gamma / torch.sqrt(bn.running_var + bn.eps)).detach().double()


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
    """The conv's weight with a following BatchNorm's per-output-channel scale folded in (float64)."""
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise ValueError("only dense, undilated convolutions are supported")
    w = conv.weight.detach().double()
    return w if bn is None else w * _bn_scale(bn)[:, None, None, None]


@dataclass
class LipschitzBound:
    """An upper bound on the Lipschitz constant of the feature map ``h`` (input of the last linear layer).

    ``l2`` bounds it from the input's L2 norm to the features' L2 norm (the product of the layers'
    operator norms); ``inf_to_2`` from the input's L-inf norm (the threat model) to the features' L2 norm.
    ``value(v)`` converts to the v-norm of the features. ``certified`` is True when every layer norm
    is exact or a proven upper bound (``method="sound"``); with ``method="power"`` the layer norms are
    power-iteration estimates times ``safety`` and the result is labelled an estimate.
    ``layers`` lists every operator with its input shape and the norms computed for it.
    """

    l2: float
    inf_to_2: float
    input_dim: int
    feature_dim: int
    method: str
    certified: bool
    layers: pd.DataFrame = field(repr=False)

    def value(self, v: float | int | str = 2) -> float:
        """Lip(h) from the input's L-inf norm to the features' v-norm."""
        return self.inf_to_2 * norm_conversion(self.feature_dim, src=2.0, dst=v)

    @property
    def input_conversion(self) -> float:
        """sqrt(n): ||r||_2 <= sqrt(n) ||r||_inf, the generic cost of the L-inf threat model."""
        return math.sqrt(self.input_dim)


class LayerTable:
    """The per-operator rows of ``lipschitz_bound`` and the norms behind them; rules add their rows here.

    ``conv`` measures a convolution (with a BatchNorm folded in) at its true input size, ``scale`` a
    lone BatchNorm, ``note`` records any other factor; each returns the value the product uses, and
    ``module`` applies the rule registered for a module's type.
    """

    def __init__(self, in_hw: dict[nn.Module, tuple[int, int]], method: str, iters: int, safety: float,
                 generator: torch.Generator):
        self.in_hw, self.method, self.iters, self.safety, self.generator = in_hw, method, iters, safety, generator
        self.rows: list[dict] = []

    def conv(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> float:
        w = _folded(conv, bn)
        hw = self.in_hw[conv]
        stride, padding = conv.stride, conv.padding
        in_dim = w.shape[1] * hw[0] * hw[1]
        out_hw = [(hw[i] + 2 * padding[i] - w.shape[2 + i]) // stride[i] + 1 for i in (0, 1)]
        small = in_dim * w.shape[0] * out_hw[0] * out_hw[1] <= DENSE_LIMIT
        nan = float("nan")
        power = nan if self.iters == 0 else conv_norm_power(w, hw, stride=stride, padding=padding, iters=self.iters,
                                                            generator=self.generator)
        if self.method == "power":
            fft = dense = nan
            used = power * self.safety
        else:      # the exact norm where the matrix fits in memory, else the FFT bound (+ a rounding margin)
            fft = conv_norm_fft(w, hw, padding=padding)
            dense = conv_norm_dense(w, hw, stride=stride, padding=padding) if small else nan
            used = (min(dense, fft) if small else fft) * (1 + 1e-9)
        self.rows.append({"operator": name, "kind": "conv+bn" if bn is not None else "conv",
                          "input": f"{w.shape[1]}x{hw[0]}x{hw[1]}", "power": power, "exact": dense, "fft": fft,
                          "used": used})
        return used

    def scale(self, name: str, bn: nn.BatchNorm2d) -> float:
        return self.note(name, "bn", _bn_scale(bn).abs().max().item())

    def note(self, name: str, kind: str, value: float) -> float:
        nan = float("nan")
        self.rows.append({"operator": name, "kind": kind, "input": "", "power": nan, "exact": nan, "fft": nan,
                          "used": value})
        return value

    def module(self, name: str, module: nn.Module) -> float:
        rule = next((LIPSCHITZ_RULES[t] for t in type(module).__mro__ if t in LIPSCHITZ_RULES), None)
        if rule is None:
            raise TypeError(f"no Lipschitz rule for {type(module).__name__} (at {name!r}); register one with "
                            "satlib.bound.lipschitz_rule")
        return rule(self, name, module)


Rule = Callable[[LayerTable, str, nn.Module], float]
LIPSCHITZ_RULES: dict[type, Rule] = {}


def lipschitz_rule(module_type: type) -> Callable[[Rule], Rule]:
    """Register ``rule(table, name, module) -> float``: an upper bound on the L2 -> L2 Lipschitz constant
    of every module of ``module_type`` (and its subclasses), adding its parts' rows to ``table``."""
    def register(rule: Rule) -> Rule:
        LIPSCHITZ_RULES[module_type] = rule
        return rule
    return register


@lipschitz_rule(nn.Conv2d)
def _conv(table: LayerTable, name: str, conv: nn.Conv2d) -> float:
    return table.conv(name, conv)


@lipschitz_rule(nn.BatchNorm2d)
def _batch_norm(table: LayerTable, name: str, bn: nn.BatchNorm2d) -> float:
    return table.scale(name, bn)


@lipschitz_rule(nn.ReLU)
def _relu(table: LayerTable, name: str, relu: nn.ReLU) -> float:
    return table.note(name, "relu", 1.0)


@lipschitz_rule(BasicBlock)
def _basic_block(table: LayerTable, name: str, block: BasicBlock) -> float:
    """ResNet-18's block relu(main(x) + shortcut(x)): Lip(main) + Lip(shortcut), ReLU 1-Lipschitz."""
    main = table.conv(f"{name}.conv1+bn1", block.conv1, block.bn1) * \
        table.conv(f"{name}.conv2+bn2", block.conv2, block.bn2)
    if len(block.shortcut):
        short = table.conv(f"{name}.shortcut", block.shortcut[0], block.shortcut[1])
    else:
        short = table.note(f"{name}.shortcut", "identity", 1.0)
    return table.note(name, "block: main + shortcut", main + short)


@lipschitz_rule(WideBlock)
def _wide_block(table: LayerTable, name: str, block: WideBlock) -> float:
    """The pre-activation block: main(pre(x)) + x, or (main + shortcut)(pre(x)) with pre = relu(bn1(x))."""
    pre = table.scale(f"{name}.bn1", block.bn1)
    main = table.conv(f"{name}.conv1+bn2", block.conv1, block.bn2) * table.conv(f"{name}.conv2", block.conv2)
    if block.shortcut is None:
        lip = main * pre + table.note(f"{name}.shortcut", "identity", 1.0)
    else:
        lip = (main + table.conv(f"{name}.shortcut", block.shortcut)) * pre
    return table.note(name, "block: main + shortcut", lip)


def _children(module: nn.Module, head: nn.Module, prefix: str = ""):
    """``(name, module)`` of the children before ``head``, in registration order, ``nn.Sequential`` expanded."""
    for name, child in module.named_children():
        if type(child) is nn.Sequential:
            yield from _children(child, head, f"{prefix}{name}.")
        elif child is not head:
            yield f"{prefix}{name}", child


def _operators(model: nn.Module, input_shape: tuple[int, int, int]):
    """The feature map as ``[(name, module, folded BatchNorm or None)]``, the input size of every conv and
    the spatial size of the pooled map, from one dummy forward pass that checks the order of the walk."""
    children = list(_children(model, last_linear(model)))
    sizes: dict[nn.Module, tuple[int, int]] = {}
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: sizes.__setitem__(mod, tuple(args[0].shape[2:])))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(lambda mod, args, out, n=n: calls.append((n, args[0], out)))
              for n, m in children]
    param = next(model.parameters())
    try:
        with attack_mode(model), torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    finally:
        for h in hooks:
            h.remove()
    if [c[0] for c in calls] != [n for n, _ in children]:
        raise TypeError(f"lipschitz_bound walks the children of {type(model).__name__} in registration order, but "
                        f"its forward pass calls {[c[0] for c in calls]}")
    ops, i = [], 0
    while i < len(children):
        name, module = children[i]
        folds = (i + 1 < len(children) and isinstance(module, nn.Conv2d)
                 and isinstance(children[i + 1][1], nn.BatchNorm2d) and calls[i + 1][1] is calls[i][2])
        if folds:      # the BatchNorm reads the conv's output itself: one linear map
            bn_name, bn = children[i + 1]
            ops.append((f"{name}+{bn_name.rsplit('.', 1)[-1]}", module, bn))
        else:
            ops.append((name, module, None))
        i += 2 if folds else 1
    return ops, sizes, tuple(calls[-1][2].shape[2:])


def lipschitz_bound(model: nn.Module, input_shape: tuple[int, int, int], *, method: str = "sound",
                    power_iters: int = 50, safety: float = 1.05, seed: int = 0) -> LipschitzBound:
    """Upper bound on the Lipschitz constant of the feature map (Chapter 6), composed from layer norms.

    ``input_shape`` is (channels, height, width) of one input: convolution norms depend on it.
    Rules (see the module docstring for the walk): conv + eval-mode BatchNorm as one linear map; a
    lone BatchNorm as its largest |scale|; ReLU 1-Lipschitz; a residual block as
    Lip(main path) + Lip(shortcut); global average pooling over an H x W map as 1 / sqrt(HW).
    The first operator must be a convolution: it is measured from L-inf to L2 directly, as the smaller of
    sqrt(n) ||A||_2 and || |A| 1 ||_2 (``first_layer_inf_to_2``). ``method="sound"`` (default): exact norms
    from the conv's matrix where it has at most ``DENSE_LIMIT`` entries, else the FFT upper bound; the
    result is certified; ``power_iters`` > 0 adds power-iteration estimates to the table as a cross-check
    (they approach each norm from below). ``method="power"``: power-iteration estimates times ``safety``
    only, not certified.
    """
    if method not in ("sound", "power"):
        raise ValueError(f"method must be 'sound' or 'power', got {method!r}")
    if power_iters < (1 if method == "power" else 0):
        raise ValueError(f"power_iters must be >= 1 with method='power' (>= 0 otherwise), got {power_iters}")
    ops, sizes, pool_hw = _operators(model, tuple(input_shape))
    (stem_name, stem_conv, stem_bn), rest_ops = ops[0], ops[1:]
    if not isinstance(stem_conv, nn.Conv2d):
        raise TypeError(f"the first layer of the feature map must be a convolution, got {type(stem_conv).__name__}")
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    table = LayerTable(sizes, method, power_iters, safety, gen)
    n = math.prod(input_shape)

    stem = table.conv(stem_name, stem_conv, stem_bn)
    rest = 1.0
    for name, module, bn in rest_ops:
        rest *= table.module(name, module) if bn is None else table.conv(name, module, bn)
    pool = table.note(f"avg-pool {pool_hw[0]}x{pool_hw[1]}", "pool", 1.0 / math.sqrt(pool_hw[0] * pool_hw[1]))
    rows_bound = first_layer_inf_to_2(_folded(stem_conv, stem_bn), sizes[stem_conv], stride=stem_conv.stride,
                                      padding=stem_conv.padding)
    table.note("first layer L-inf -> L2 via rows", "inf->2", rows_bound)
    table.note("first layer L-inf -> L2 via sqrt(n)", "inf->2", math.sqrt(n) * stem)
    l2 = stem * rest * pool
    inf_to_2 = min(rows_bound, math.sqrt(n) * stem) * rest * pool
    return LipschitzBound(l2=l2, inf_to_2=inf_to_2, input_dim=n, feature_dim=last_linear(model).in_features,
                          method=method, certified=method == "sound", layers=pd.DataFrame(table.rows))
