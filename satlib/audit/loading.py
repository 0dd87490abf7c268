"""Loading a checkpoint from elsewhere into a model the book's tools can attack (``satlib audit``).

A checkpoint is read with ``torch.load(weights_only=True)`` (``satlib.checkpoints.safe_load``): a
file cut short, damaged or holding a pickled model is refused with one sentence. The weights may sit
under ``state_dict`` or ``model`` (as training scripts save them with their optimiser), and their
names may carry the prefixes ``module.`` (``DataParallel``) or ``_orig_mod.`` (``torch.compile``).
The architecture is a name of ``satlib.models`` (a ResNet-18's width is read from the weights) or
``package.module:factory``, a function that returns an ``nn.Module``. Weights that do not fit it are
refused with one sentence naming the missing and unexpected keys.

A model that expects normalised inputs gets ``normalize(model, mean, std)``: every attack then works
in [0, 1] pixel space with eps in those units, and the layer names stay those of the model.
"""
from __future__ import annotations

import hashlib
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..catalog import DatasetInfo
from ..checkpoints import CheckpointError, safe_load, state_dict_of
from ..errors import SatlibError
from ..models import MODELS, build_model

NESTED = ("state_dict", "model")           # where training scripts put the weights beside other state
PREFIXES = ("module.", "_orig_mod.")       # DataParallel / DistributedDataParallel, torch.compile
SHOWN = 4                                  # keys named in an error before "and N more"


class AuditError(SatlibError, ValueError):
    """A checkpoint, architecture or option the audit cannot use; the message is one sentence."""


def file_digest(path: str | Path) -> str:
    """SHA-256 of the file's bytes: the identity of a checkpoint in the audit's cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights in ``path``: unnested from ``state_dict`` / ``model`` and stripped of
    ``module.`` / ``_orig_mod.`` prefixes; ``CheckpointError`` (one sentence) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        obj = safe_load(path)
    except CheckpointError as err:
        if "Python objects" in str(err):
            raise CheckpointError(f"{err}: it looks like a whole pickled model; save model.state_dict() instead "
                                  f"and pass the architecture with --model") from None
        raise
    while isinstance(obj, Mapping) and not _is_weights(obj) and any(isinstance(obj.get(k), Mapping) for k in NESTED):
        obj = next(obj[k] for k in NESTED if isinstance(obj.get(k), Mapping))
    weights = state_dict_of(obj, path)
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix):]: v for k, v in weights.items()}
    return {k.replace("._orig_mod.", ".").replace(".module.", "."): v for k, v in weights.items()}


def _is_weights(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def build_architecture(spec: str, dataset: DatasetInfo, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """``resnet18`` (its width from ``conv1.weight``), ``wrn-28-10``, or ``package.module:factory`` called with
    no arguments; one-sentence ``AuditError`` when the factory cannot be imported or returns no module."""
    if spec in MODELS:
        stem = weights.get("conv1.weight")
        width = int(stem.shape[0]) if stem is not None and stem.dim() == 4 else 64
        return build_model(spec, num_classes=dataset.num_classes, in_channels=dataset.channels, width=width)
    if ":" not in spec:
        raise AuditError(f"unknown model {spec!r}; give one of {', '.join(MODELS)} or package.module:factory")
    module_name, _, factory_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as err:
        raise AuditError(f"cannot import the model factory {spec!r} ({type(err).__name__}: {err})") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise AuditError(f"the model factory {spec!r} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def fit_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], *, source: str = "the checkpoint") -> nn.Module:
    """Load ``weights`` into ``model`` strictly; a mismatch is one sentence naming the missing, unexpected
    and wrongly shaped keys. Returns the model in eval mode."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} for {tuple(own[k].shape)}" for k in own
              if k in weights and weights[k].shape != own[k].shape]
    problems = [f"{what} {_some(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if keys]
    if problems:
        raise AuditError(f"{source} does not fit the {type(model).__name__} model: {'; '.join(problems)}")
    model.load_state_dict(dict(weights))
    return model.eval()


def _some(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown if len(keys) <= SHOWN else f"{shown} and {len(keys) - SHOWN} more"


def parse_normalize(text: str, channels: int) -> tuple[list[float], list[float]]:
    """``"MEAN,STD"`` (one value for every channel) or ``C`` means then ``C`` standard deviations."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 2:
        return [values[0]] * channels, [values[1]] * channels
    if len(values) == 2 * channels and channels > 1:
        return values[:channels], values[channels:]
    raise AuditError(f"--normalize takes MEAN,STD or {channels} means then {channels} standard deviations "
                     f"separated by commas, got {text!r}")


def normalize(model: nn.Module, mean: Sequence[float], std: Sequence[float]
              ) -> tuple[torch.utils.hooks.RemovableHandle, float]:
    """Feed ``model`` with ``(x - mean) / std`` per channel: a forward pre-hook, so that layer names stay the
    model's and ``handle.remove()`` undoes it. Returns ``(handle, stretch)``.

    ``stretch = max 1 / std`` is the factor by which the normalisation can lengthen an L-inf
    perturbation: a Lipschitz bound of the model behind it, times ``stretch``, bounds the whole map.
    """
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise AuditError(f"the normalisation needs one mean and one positive standard deviation per channel, "
                         f"got means {list(mean)} and standard deviations {list(std)}")
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1) for v in (mean, std))

    def pre_hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return ((x - mean_t.to(x.device, x.dtype)) / std_t.to(x.device, x.dtype), *args[1:])

    return model.register_forward_pre_hook(pre_hook), float(max(1.0 / s for s in std))
