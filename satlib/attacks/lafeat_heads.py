"""LAFEAT's heads: small classifiers fitted on a frozen model's intermediate features (Yu et al. 2021; Chapter 4).

A head ``g_l`` reads the output ``f^l(x)`` of layer ``l`` and learns to predict the model's own label,
so that ``satlib.attacks.LAFEAT`` can attack through that layer. The shape and training follow the
LAFEAT authors' public code where their paper is silent: global average pooling and two linear layers
of width C (no non-linearity) on the output of the penultimate residual block; Adam (lr 1e-3,
cosine-annealed to 1e-5, no weight decay), 100 epochs, batch 128 (``HEAD_DEFAULTS``). Two choices
differ and are options: the heads learn the model's *own* labels (``target="model"``; the authors'
script fits the dataset labels, ``target="labels"``), and the training data is used as given (their
script augments with crop + flip).

``fit_heads`` is the one way the library builds the heads of an attack: trained once, then read from
a cache (a run's artifacts, an audit's folder) under a name made of the layers and the options.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ArrayDataset
from ..batching import batches
from ..models import FeatureTap, residual_blocks
from ..progress import bar
from .base import attack_mode

# Head shape and training of the LAFEAT authors' code; ``fit_heads`` names its cache after these.
HEAD_DEFAULTS = dict(epochs=100, lr=1e-3, min_lr=1e-5, batch_size=128, weight_decay=0.0, hidden=None,
                     pool="avg", activation=False, target="model")
POOLS = ("avg", "none")
TARGETS = ("model", "labels")

TensorCache = Callable[[str, Callable[[], dict]], dict]     # e.g. ``Run.cached_tensors``


def default_layers(model: nn.Module) -> list[str]:
    """The authors' head position: the output of the penultimate residual block (``layer4.0`` of ResNet-18)."""
    blocks = residual_blocks(model)
    if len(blocks) < 2:
        raise ValueError("the model has fewer than two residual blocks; pass the head layers explicitly")
    return [blocks[-2]]


def make_head(in_shape: Sequence[int], num_classes: int, *, hidden: int | None = None, pool: str = "avg",
              activation: bool = False) -> nn.Sequential:
    """A LAFEAT head for features of shape ``in_shape`` = (C, H, W) (or (d,) for flat features).

    ``pool="avg"``: global average pooling, then ``Linear(C, hidden)`` and ``Linear(hidden, classes)``
    (the authors' head; ``hidden`` defaults to C). ``pool="none"``: the flattened map feeds the first
    linear layer (the SAT release's ResNet head, there with ``hidden=256`` and a ReLU). ``activation``
    puts a ReLU between the two linear layers; without it the head is a linear map of the features.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    shape = tuple(int(s) for s in in_shape)
    if pool == "avg" and len(shape) == 3:
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        width = shape[0]
    else:
        layers = [nn.Flatten()]
        width = math.prod(shape)
    hidden = width if hidden is None else int(hidden)
    if hidden < 1:
        raise ValueError(f"hidden must be a positive width, got {hidden}")
    layers.append(nn.Linear(width, hidden))
    if activation:
        layers.append(nn.ReLU())
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


def feature_shapes(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of each layer's output for inputs like ``x`` (one forward pass on ``x[:1]``)."""
    with attack_mode(model), torch.no_grad(), FeatureTap(model, list(layers)) as tap:
        model(x[:1])
        return {l: tuple(tap[l].shape[1:]) for l in layers}


def make_heads(model: nn.Module, x: torch.Tensor, layers: Sequence[str], num_classes: int, *,
               hidden: int | None = None, pool: str = "avg", activation: bool = False) -> dict[str, nn.Module]:
    """Fresh (untrained) heads for ``layers``, sized from one forward pass on ``x[:1]``, on the model's device."""
    device = next(model.parameters()).device
    shapes = feature_shapes(model, x.to(device), layers)
    return {l: make_head(shapes[l], num_classes, hidden=hidden, pool=pool, activation=activation).to(device)
            for l in layers}


def heads_state(heads: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """All heads' parameters in one flat dict (``"<layer>/<param>"``), e.g. for ``Run.cached_tensors``."""
    return {f"{layer}/{k}": v.detach().cpu() for layer, head in heads.items() for k, v in head.state_dict().items()}


def _model_labels(model: nn.Module, data, batch_size: int = 500) -> torch.Tensor:
    with attack_mode(model), torch.no_grad():
        return torch.cat([model(x).argmax(1) for x, _ in batches(data, batch_size, shuffle=False)])


def _features(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    with attack_mode(model), torch.no_grad(), FeatureTap(model, list(layers)) as tap:
        model(x)
        return {l: tap[l].float() for l in layers}


def train_heads(model: nn.Module, data, layers: Sequence[str] | None = None, *, epochs: int = 100,
                lr: float = 1e-3, min_lr: float = 1e-5, batch_size: int = 128, weight_decay: float = 0.0,
                hidden: int | None = None, pool: str = "avg", activation: bool = False, target: str = "model",
                seed: int = 0, cache_bytes: int = 2 ** 31, progress: bool = False) -> dict[str, nn.Module]:
    """Fit one LAFEAT head per layer on the frozen ``model``'s features of ``data`` (Chapter 4).

    The heads learn to predict the model's own labels (``target="model"``: arg max of its logits on
    the clean inputs) or the dataset's (``target="labels"``). All heads train jointly on the sum of
    their cross-entropies with Adam (``lr`` cosine-annealed to ``min_lr`` over ``epochs``), as in the
    authors' code. The model is never changed: it stays frozen, in eval mode, and its mode and
    ``requires_grad`` flags are restored. Features are computed once and kept on the device when
    they fit in ``cache_bytes``; otherwise every epoch recomputes them batch by batch.
    Returns ``{layer: head}`` in eval mode, on the model's device.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs, batch_size and lr must be positive, got {epochs}, {batch_size}, {lr}")
    layers = default_layers(model) if layers is None else list(layers)
    device = next(model.parameters()).device
    data = data.to(device)
    x_all = data.x
    labels = _model_labels(model, data) if target == "model" else data.y
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = make_heads(model, x_all, layers, data.num_classes, hidden=hidden, pool=pool, activation=activation)
    shapes = feature_shapes(model, x_all, layers)
    size = 4 * len(x_all) * sum(math.prod(s) for s in shapes.values())
    cached = None
    if size <= cache_bytes:
        parts = [_features(model, x, layers) for x, _ in batches(data, 500, shuffle=False)]
        cached = {l: torch.cat([p[l] for p in parts]) for l in layers}
    params = [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=min_lr)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    try:
        for h in heads.values():
            h.train()
        for _ in bar(range(epochs), desc="LAFEAT heads", enabled=progress):
            for idx in torch.randperm(len(x_all), generator=gen).to(device).split(batch_size):
                if cached is not None:
                    feats = {l: cached[l][idx] for l in layers}
                else:
                    feats = _features(model, x_all[idx], layers)
                loss = sum(F.cross_entropy(heads[l](feats[l]), labels[idx]) for l in layers)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    finally:
        model.train(was_training)
    opt.zero_grad(set_to_none=True)
    for h in heads.values():
        h.eval()
    return heads


def head_agreement(model: nn.Module, heads: Mapping[str, nn.Module], data, *, batch_size: int = 500,
                   target: str = "model") -> dict[str, float]:
    """Fraction of ``data`` on which each head predicts the model's own label (or the true one, ``target="labels"``)."""
    device = next(model.parameters()).device
    hits = {l: 0 for l in heads}
    with attack_mode(model), attack_mode(nn.ModuleList(heads.values())), torch.no_grad(), \
            FeatureTap(model, list(heads)) as tap:
        for x, y in batches(data, batch_size, shuffle=False):
            pred = model(x.to(device)).argmax(1)
            ref = pred if target == "model" else y.to(device)
            for l, head in heads.items():
                hits[l] += (head(tap[l].float()).argmax(1) == ref).sum().item()
    return {l: h / len(data) for l, h in hits.items()}



def heads_from_state(state: Mapping[str, torch.Tensor], *, device: torch.device | str | None = None
                     ) -> dict[str, nn.Module]:
    """Heads rebuilt from a ``heads_state`` dict alone, in eval mode: the widths are the shapes of its weights,
    the pooling and the ReLU show in the positions of its two linear layers (``make_head``)."""
    heads = {}
    for layer in dict.fromkeys(k.rsplit("/", 1)[0] for k in state):
        own = {k[len(layer) + 1:]: v for k, v in state.items() if k.rsplit("/", 1)[0] == layer}
        linear = sorted(int(k.split(".")[0]) for k in own if k.endswith(".weight"))
        (hidden, width), (classes, _) = own[f"{linear[0]}.weight"].shape, own[f"{linear[-1]}.weight"].shape
        shape = (width, 1, 1) if linear[0] == 2 else (width,)      # pooled heads start with pool + flatten
        head = make_head(shape, classes, hidden=hidden, activation=linear[-1] - linear[0] == 2)
        head.load_state_dict(own)
        heads[layer] = head.to(device).eval()
    return heads


def heads_name(layers: Sequence[str], options: Mapping[str, object]) -> str:
    """The cache name of heads on ``layers`` trained with ``options`` (every ``train_heads`` option, and the seed)."""
    digest = hashlib.sha256(repr(sorted(options.items())).encode()).hexdigest()[:10]
    return f"lafeat-heads-{'+'.join(layers)}-{digest}"


def fit_heads(model: nn.Module, data: ArrayDataset | Callable[[], ArrayDataset], layers: Sequence[str] | None = None,
              *, cache: TensorCache | None = None, seed: int = 0, **options) -> dict[str, nn.Module]:
    """The heads LAFEAT needs: ``train_heads`` on ``data``, or the copy that ``cache`` keeps (Chapter 4).

    ``data`` is the training set, or a function that returns it (called only when the heads are not
    cached); ``layers`` defaults to the penultimate residual block; ``options`` are those of
    ``train_heads`` (``HEAD_DEFAULTS`` fills the rest). ``cache(name, compute)`` returns the tensors
    stored under ``name`` or computes and keeps them, like ``Run.cached_tensors``; the name depends on
    the layers and every option, not on the model, so give each model its own cache.
    Returns ``{layer: head}`` in eval mode on the model's device.
    """
    unknown = sorted(set(options) - set(HEAD_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown head option(s) {', '.join(unknown)}; the options are {', '.join(HEAD_DEFAULTS)}")
    layers = default_layers(model) if layers is None else list(layers)
    options = {**HEAD_DEFAULTS, **options, "seed": seed}

    def compute() -> dict[str, torch.Tensor]:
        return heads_state(train_heads(model, data() if callable(data) else data, layers, **options))

    state = compute() if cache is None else cache(heads_name(layers, options), compute)
    return heads_from_state(state, device=next(model.parameters()).device)
