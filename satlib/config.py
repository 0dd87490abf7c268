"""Presets and validated configuration for every experiment of the book (Chapter 1, "Running the book").

A ``Config`` holds every knob of a run. ``resolve(preset, **overrides)`` starts from a preset, applies
the preset's tuned values for the chosen method (``TUNED``), then the overrides that are not ``None``
(papermill passes ``None`` for "keep the preset's value"); it checks each knob's name, type and
range against the tables of ``satlib.catalog`` and raises ``ConfigError`` with one sentence naming
the knob and what is allowed, before any work starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, fields
from typing import Any

from . import catalog
from .errors import SatlibError
from .models import MODELS


class ConfigError(SatlibError, ValueError):
    """A knob has a wrong name, type or value; the message is one sentence that says which and why."""


# The per-sample weight of Eq. 7's shift term that matches the released code's lambda = 0.087 at batch
# 128. The code subtracts 0.087 times ONE Frobenius norm over the batch from the batch-MEAN CE; per
# sample that is 0.087 * sqrt(B) times the sample's own shift norm when the shifts are alike
# (``satlib.training.objectives.per_sample_lambda``, which config cannot import: it sits above it;
# Chapter 5, "Lambda in per-sample units").
RELEASED_LAMBDA = 0.087 * math.sqrt(128)


@dataclass(frozen=True)
class Config:
    """Every knob of one experiment. Pixel values live in [0, 1]; ``eps`` and ``step_size`` are in those units."""

    preset: str = "quick"
    dataset: str = "digits"
    model: str = "resnet18"
    width: int = 16                      # first-stage width of ResNet-18 (64 in the paper)
    method: str = "pgd-at"
    seed: int = 0
    # optimisation (Sec. 6.1)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"               # "step": times lr_decay at lr_decay_at; "cosine": cosine decay to 0
    lr_decay_at: tuple[float, ...] = (0.5, 0.75)   # fractions of `epochs` (100 and 150 of 200)
    lr_decay: float = 0.1
    augment: str = "none"
    val_size: int = 1000                 # training images held out (stratified) for the monitor and the best epoch
    train_limit: int = 0                 # train on the first n remaining images only (0 = all); for smoke tests
    # threat model and training attack (Eq. 1)
    eps: float = 0.2
    step_size: float = 0.05
    attack_steps: int = 10
    # method weights (Chapter 5; each method declares which it uses in satlib.catalog.METHODS)
    trades_beta: float = 6.0
    mart_beta: float = 5.0
    awp_gamma: float = 0.01
    awp_warmup: int = 0
    sat_lambda: float = RELEASED_LAMBDA   # per-sample weight of Eq. 7's shift term (see RELEASED_LAMBDA)
    sat_beta: float = 0.1
    sat_cluster_form: str = "paper"      # "paper": Eq. 10; "code": the released code's L_Cluster (Chapter 5)
    # per-epoch monitoring: clean and PGD accuracy on the held-out validation images
    monitor_steps: int = 10
    snapshot_epochs: tuple[int, ...] = ()   # also keep the weights after these epochs (for per-epoch analyses)
    # evaluation defaults (Table 1: 100-step BIM/PGD/CW)
    eval_steps: int = 100
    eval_size: int = 0                   # evaluate on the first n test samples (0 = all)
    # hardware
    device: str = "auto"
    # Speed only: these change the trained weights by rounding at most, so the run store ignores them.
    # Reported numbers (evaluations, the per-epoch monitor) are always computed in fp32.
    amp: bool = True                     # bf16 autocast of the training step where the device supports it (CUDA)
    cuda_graphs: str = "auto"            # whole training step as one CUDA graph: "auto" (single-GPU runs), "on", "off"
    fold_bn: bool = True                 # training attack through BatchNorm folded into the convolutions
    channels_last: bool = True

    # -- identity ---------------------------------------------------------------------------------
    def training_key(self) -> dict[str, Any]:
        """The knobs that change the trained weights: what the run store hashes (Chapter 1, run store).

        A method's weights that it does not declare (``catalog.METHODS``) are left out, and so are the
        attack's knobs for a method without a training attack.
        """
        skip = {"preset", "monitor_steps", "snapshot_epochs", "eval_steps", "eval_size", "device", "amp",
                "cuda_graphs", "fold_bn", "channels_last"}
        method = catalog.METHODS[self.method]
        skip |= {k for m in catalog.METHODS.values() for k in m.knobs} - set(method.knobs)
        if method.inner is None:
            skip |= {"eps", "step_size", "attack_steps"}
        if self.schedule != "step":
            skip |= {"lr_decay_at", "lr_decay"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def run_id(self) -> str:
        """Short stable name of the trained model: method, dataset, model and a hash of the training key."""
        blob = json.dumps(self.training_key(), sort_keys=True, default=list).encode()
        return f"{self.method}-{self.dataset}-{self.model}-{hashlib.sha256(blob).hexdigest()[:10]}"

    def milestones(self) -> list[int]:
        """Epochs after which the step schedule multiplies the learning rate by ``lr_decay``."""
        return sorted({max(1, round(f * self.epochs)) for f in self.lr_decay_at})

    def explicit(self) -> dict[str, Any]:
        """The method and the knobs whose values differ from the preset's (tuned) values for it."""
        defaults = resolve(self.preset, method=self.method).as_dict()
        return {"method": self.method, **{k: v for k, v in self.as_dict().items() if v != defaults[k]}}

    def replace(self, **overrides: Any) -> "Config":
        """A validated copy with some knobs changed (``None`` values are ignored).

        Knobs that still have the preset's value follow the preset: ``cfg.replace(method="trades")``
        takes TRADES' tuned learning rate, while a learning rate set explicitly stays.
        """
        return resolve(self.preset, **{**self.explicit(), **{k: v for k, v in overrides.items() if v is not None}})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # bundled scikit-learn digits, CPU, a chapter in minutes. eps 0.2 gives a CIFAR-like regime on digits
    # (standard training: 98% clean / 2% PGD). 200 of the 1,347 training digits are held out for validation.
    # SAT's beta: Eq. 10 sums standard deviations over all d_l feature dimensions, so its scale grows with
    # the layer's width; with the paper's 0.1 the quick model collapses its features (Chapter 5, "How large
    # should beta be?"); 0.003 starts beta * L_Cluster at about a tenth of the cross-entropy.
    # 10 epochs with a cosine schedule converge (Chapter 5 tunes each method's learning rate on that budget).
    "quick": dict(dataset="digits", width=16, epochs=10, schedule="cosine", batch_size=128, eps=0.2, step_size=0.08,
                  attack_steps=5, val_size=200, monitor_steps=5, eval_steps=50, snapshot_epochs=(1, 3, 6, 10),
                  sat_beta=0.003),
    # the paper's setting (Sec. 6.1), CIFAR-10, ResNet-18 with a 3x3 stem; 1,000 training images held out
    # for validation, as in the robust-overfitting literature
    "paper": dict(dataset="cifar10", width=64, epochs=200, batch_size=128, eps=8 / 255, step_size=2 / 255,
                  attack_steps=10, val_size=1000, eval_steps=100, snapshot_epochs=(1, 50, 100, 150, 200),
                  # Eq. 10 at the paper's shape sums 8192 standard deviations per layer (512 x 4 x 4), 64 times
                  # the quick model's 128: beta scaled by the same factor keeps beta * L_Cluster at the share of
                  # the loss that trains well on the quick preset (Chapter 5: with 0.1 it starts at ~230x CE)
                  sat_beta=0.003 * 128 / 8192),
}
PRESETS["paper-wrn"] = {**PRESETS["paper"], "model": "wrn-28-10", "mart_beta": 6.0,
                        "sat_beta": 0.003 * 128 / 40960}      # WRN-28-10's last stage: 640 x 8 x 8 per block
PRESETS["paper-cifar100"] = {**PRESETS["paper"], "dataset": "cifar100"}
PRESETS["paper-svhn"] = {**PRESETS["paper"], "dataset": "svhn"}

# Per preset and method, the values chosen by the tuning protocol of Chapter 5 ("Every defence trained
# properly"): the same compute budget for every method (the preset's 10 epochs, cosine schedule), a
# grid of learning rates (0.02, 0.05, 0.1) times three values of the method's own weight, each point
# scored by PGD-10 accuracy on the 200 validation digits held out of the training split (never the
# test set). SAT's lambda comes from the paper's greedy search on the chosen PGD-AT model (0.04 per
# sample); SAT-TRADES and SAT-AWP-AT keep their base's chosen weight. The grid with every score is
# data/tuning_quick.csv (`python -m satlib.studies tuning`). The paper presets keep the reference
# hyperparameters of each method's authors.
TUNED: dict[str, dict[str, dict[str, Any]]] = {"quick": {
    "pgd-at": dict(lr=0.1),
    "trades": dict(lr=0.1, trades_beta=1.0),
    "mart": dict(lr=0.05, mart_beta=3.0),
    "awp-at": dict(lr=0.05, awp_gamma=0.0025),
    "sat": dict(lr=0.1, sat_beta=0.003, sat_lambda=0.04),
    "sat-trades": dict(lr=0.1, sat_beta=0.001, sat_lambda=0.04, trades_beta=1.0),
    "sat-awp-at": dict(lr=0.05, sat_beta=0.01, sat_lambda=0.04, awp_gamma=0.0025),
}}


def _choices() -> dict[str, tuple[str, ...]]:
    return {"dataset": tuple(catalog.DATASETS), "model": MODELS, "method": tuple(catalog.METHODS),
            "augment": catalog.AUGMENTATIONS, "device": catalog.DEVICES, "cuda_graphs": catalog.CUDA_GRAPHS,
            "sat_cluster_form": catalog.CLUSTER_FORMS, "schedule": catalog.SCHEDULES}


_POSITIVE = {"width", "epochs", "batch_size", "lr", "eval_steps"}
_NON_NEGATIVE = {"seed", "momentum", "weight_decay", "train_limit", "val_size", "eps", "step_size", "attack_steps",
                 "trades_beta", "mart_beta", "awp_gamma", "awp_warmup", "sat_lambda", "sat_beta",
                 "monitor_steps", "eval_size"}


def resolve(preset: str = "quick", **overrides: Any) -> Config:
    """The preset's ``Config`` with its tuned values for the method and ``overrides`` applied, validated.

    ``None`` overrides keep the preset's value, so a notebook's parameters cell can default to ``None``.
    """
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {preset!r}.")
    known = {f.name for f in fields(Config)}
    for name in overrides:
        if name not in known:
            raise ConfigError(f"unknown parameter {name!r}; known parameters are {', '.join(sorted(known))}.")
    given = {k: v for k, v in overrides.items() if v is not None and k != "preset"}
    method = _check("method", given.get("method", PRESETS[preset].get("method", Config.method)))
    values: dict[str, Any] = {"preset": preset, **PRESETS[preset], **TUNED.get(preset, {}).get(method, {}), **given}
    return Config(**{name: _check(name, value) for name, value in values.items()})


def _check(name: str, value: Any) -> Any:
    """Validate one knob against the type of its default and its allowed range."""
    default = next(f.default for f in fields(Config) if f.name == name)
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}.")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{name} must be a finite number, got {value!r}.")
    elif kind is tuple:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"{name} must be a list of numbers, got {value!r}.")
        value = tuple(value)
        if name == "snapshot_epochs" and not all(isinstance(v, int) and v >= 1 for v in value):
            raise ConfigError(f"snapshot_epochs must be a list of epoch numbers >= 1, got {value!r}.")
        if name == "lr_decay_at" and not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in value):
            raise ConfigError(f"lr_decay_at must be a list of fractions of the training in (0, 1], got {value!r}.")
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}.")
    choices = _choices()
    if name in choices and value not in choices[name]:
        raise ConfigError(f"{name} must be one of {', '.join(choices[name])}, got {value!r}.")
    if name in _POSITIVE and value <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}.")
    if name in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{name} must be zero or positive, got {value!r}.")
    if name in ("eps", "step_size") and value > 1:
        raise ConfigError(f"{name} is in pixel units of [0, 1] and must be at most 1, got {value!r}.")
    if name in ("momentum", "lr_decay") and not 0 <= value <= 1:
        raise ConfigError(f"{name} must lie in [0, 1], got {value!r}.")
    return value


def distinct_knobs(cfg: Config) -> str:
    """The training knobs in which ``cfg`` departs from its preset, e.g. ``lr=0.01 width=4`` (method, dataset,
    model, seed and epochs have columns of their own)."""
    default = resolve(cfg.preset, method=cfg.method).training_key()
    own = {"method", "dataset", "model", "seed", "epochs"}
    return " ".join(f"{knob}={_compact(value)}" for knob, value in cfg.training_key().items()
                    if knob not in own and default.get(knob) != value)


def _compact(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(map(_compact, value)) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
