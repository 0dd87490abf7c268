"""BatchNorm folded into the preceding convolution, for the attack passes of training (Chapter 1).

The training attack runs the model in eval mode with its weights fixed, and an eval-mode BatchNorm is
the per-channel affine map ``x -> s x + t`` with ``s = gamma / sqrt(var + eps)`` and
``t = beta - mean s``. Applied right after a convolution it can be folded into it:
``conv(x; W) s + t = conv(x; W s) + t``. A folded network computes the same logits with about a
third fewer kernels per pass, forward and backward, which matters where a step is bound by kernel
launches rather than arithmetic (a ResNet-18 at batch 128 on a GPU).

``FoldedView(model)`` is a companion of ``model`` whose conv-BatchNorm pairs are fused; every other
parameter and buffer is *shared* with ``model``. ``refresh()`` recomputes the fused weights from the
model's current ones (a few small in-place kernels, so it can run inside a captured CUDA graph).
Module names are kept, so ``FeatureTap`` reads the same layers from the view as from the model.

Which BatchNorms follow a convolution is read from the model's graph with ``torch.fx`` (a BatchNorm
whose only input is a convolution used by nothing else). A model that ``torch.fx`` cannot trace, or
that has no such pair, gets no view (``FoldedView.of`` returns ``None``) and is attacked unfolded.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Names ``(conv, batchnorm)`` of every BatchNorm applied directly, and only, to a convolution's output."""
    modules = dict(model.named_modules())
    graph = fx.symbolic_trace(model).graph
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BATCHNORMS):
            continue
        source = node.args[0]
        if (isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), _CONVS) and len(source.users) == 1):
            pairs.append((source.target, node.target))
    return pairs


class FoldedView:
    """An eval-mode twin of ``model`` with its conv-BatchNorm pairs fused (see the module docstring)."""

    def __init__(self, model: nn.Module, pairs: list[tuple[str, str]]):
        self.model = model
        self.module = copy.deepcopy(model).eval()
        live, twin = dict(model.named_modules()), dict(self.module.named_modules())
        for name, module in twin.items():            # share everything; fused convs get their own tensors below
            module._parameters = live[name]._parameters
            module._buffers = live[name]._buffers
        self._fused = []
        for conv_name, bn_name in pairs:
            conv, bn = live[conv_name], live[bn_name]
            fused = copy.copy(twin[conv_name])
            bias = torch.empty(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
            fused._parameters = {"weight": nn.Parameter(torch.empty_like(conv.weight), requires_grad=False),
                                 "bias": nn.Parameter(bias, requires_grad=False)}
            _replace(self.module, conv_name, fused)
            _replace(self.module, bn_name, nn.Identity())
            self._fused.append((conv, bn, fused))
        self.refresh()

    @classmethod
    def of(cls, model: nn.Module) -> "FoldedView | None":
        """The folded view of ``model``, or ``None`` if it cannot be traced or has nothing to fold."""
        try:
            pairs = conv_bn_pairs(model)
        except Exception:       # torch.fx cannot trace data-dependent control flow: attack unfolded
            return None
        return cls(model, pairs) if pairs else None

    @torch.no_grad()
    def refresh(self) -> nn.Module:
        """Recompute the fused weights from the model's current weights and statistics; return the view.

        ``W' = W s`` and ``b' = beta + (b - mean) s`` with ``s = gamma / sqrt(var + eps)``, for all pairs
        at once with PyTorch's multi-tensor (``_foreach``) kernels, as its optimisers use them: a handful
        of launches instead of several per layer.
        """
        convs, bns, fused = zip(*self._fused)
        scale = torch._foreach_add([bn.running_var for bn in bns], [bn.eps for bn in bns])
        torch._foreach_rsqrt_(scale)
        torch._foreach_mul_(scale, [bn.weight if bn.affine else torch.ones_like(bn.running_var) for bn in bns])
        shift = torch._foreach_sub([c.bias if c.bias is not None else torch.zeros_like(bn.running_mean)
                                    for c, bn in zip(convs, bns)], [bn.running_mean for bn in bns])
        torch._foreach_mul_(shift, scale)
        torch._foreach_add_(shift, [bn.bias if bn.affine else torch.zeros_like(bn.running_mean) for bn in bns])
        torch._foreach_copy_([f.bias for f in fused], shift)
        torch._foreach_copy_([f.weight for f in fused], [c.weight for c in convs])
        torch._foreach_mul_([f.weight for f in fused],
                            [s.view((-1,) + (1,) * (c.weight.dim() - 1)) for s, c in zip(scale, convs)])
        return self.module


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
