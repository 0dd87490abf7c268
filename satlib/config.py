"""Presets and validated configuration for every experiment of the book.

A ``Config`` holds every knob of a run. ``resolve(preset, **overrides)`` starts from a preset, applies
the overrides that are not ``None`` (papermill passes ``None`` for "keep the preset's value"), checks
each knob's name, type and range, and raises ``ConfigError`` with one sentence naming the knob and
what is allowed, before any work starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A knob has a wrong name, type or value; the message is one sentence that says which and why."""


DATASETS = ("digits", "cifar10", "cifar100", "svhn", "synthetic")
MODELS = ("resnet18", "wrn-28-10")
METHODS = ("standard", "pgd-at", "trades", "mart", "awp-at", "sat", "sat-trades", "sat-awp-at")
AUGMENTATIONS = ("none", "crop", "crop-flip")
DEVICES = ("auto", "cpu", "cuda")
CLUSTER_FORMS = ("paper", "code")   # L_Cluster: Eq. 10 as printed, or the released code's variant (Chapter 5)
CUDA_GRAPHS = ("auto", "on", "off")


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
    lr_decay_at: tuple[float, ...] = (0.5, 0.75)   # fractions of `epochs` (100 and 150 of 200)
    lr_decay: float = 0.1
    augment: str = "none"
    train_limit: int = 0                 # use only the first n training samples (0 = all); for smoke tests
    # threat model and training attack (Eq. 1)
    eps: float = 0.2
    step_size: float = 0.05
    attack_steps: int = 10
    # method weights (NOTES E8, E9)
    trades_beta: float = 6.0
    mart_beta: float = 5.0
    awp_gamma: float = 0.01
    awp_warmup: int = 0
    sat_lambda: float = 0.087
    sat_beta: float = 0.1
    sat_cluster_form: str = "paper"      # "paper": Eq. 10; "code": the released code's L_Cluster (NOTES E8)
    # per-epoch monitoring: clean and PGD accuracy on the first `monitor_size` test samples
    monitor_size: int = 512
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
        """The knobs that change the trained weights: what the run store hashes (Chapter 1, run store)."""
        skip = {"preset", "monitor_size", "monitor_steps", "snapshot_epochs", "eval_steps", "eval_size",
                "device", "amp", "cuda_graphs", "fold_bn", "channels_last"}
        key = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        # method weights that a method does not use must not split the store
        uses = {"trades_beta": ("trades", "sat-trades"), "mart_beta": ("mart",),
                "awp_gamma": ("awp-at", "sat-awp-at"), "awp_warmup": ("awp-at", "sat-awp-at"),
                "sat_lambda": ("sat", "sat-trades", "sat-awp-at"), "sat_beta": ("sat", "sat-trades", "sat-awp-at"),
                "sat_cluster_form": ("sat", "sat-trades", "sat-awp-at")}
        for knob, methods in uses.items():
            if self.method not in methods:
                key.pop(knob)
        if self.method == "standard":
            for knob in ("eps", "step_size", "attack_steps"):
                key.pop(knob)
        return key

    def run_id(self) -> str:
        """Short stable name of the trained model: method, dataset, model and a hash of the training key."""
        blob = json.dumps(self.training_key(), sort_keys=True, default=list).encode()
        return f"{self.method}-{self.dataset}-{self.model}-{hashlib.sha256(blob).hexdigest()[:10]}"

    def milestones(self) -> list[int]:
        """Epochs after which the learning rate is multiplied by ``lr_decay``."""
        return sorted({max(1, round(f * self.epochs)) for f in self.lr_decay_at})

    def replace(self, **overrides: Any) -> "Config":
        """A validated copy with some knobs changed (``None`` values are ignored)."""
        return resolve(**{**self.as_dict(), **{k: v for k, v in overrides.items() if v is not None}})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # bundled scikit-learn digits, CPU, a chapter in minutes (DESIGN: eps 0.2 gives a CIFAR-like regime)
    # measured on 2 cores: 15 epochs of 5-step PGD-AT take ~15 s and reach ~97% clean / ~60% PGD accuracy
    # (20 epochs of 10 steps: ~31 s, ~97% / ~66%); the per-epoch monitor is kept small (200 samples, PGD-5)
    # SAT's beta: Eq. 10 sums standard deviations over all d_l feature dimensions, so its scale grows with
    # the layer's width; with the paper's 0.1 the quick model collapses its features (measured: 19% clean
    # accuracy; 0.01 gives 90% / 56%, 0.003 gives 95% / 58%); Chapter 5 discusses the choice.
    "quick": dict(dataset="digits", width=16, epochs=15, batch_size=128, eps=0.2, step_size=0.08,
                  attack_steps=5, monitor_size=200, monitor_steps=5, eval_steps=50, snapshot_epochs=(1, 5, 10, 15),
                  sat_beta=0.003),
    # the paper's setting (Sec. 6.1), CIFAR-10, ResNet-18 with a 3x3 stem
    "paper": dict(dataset="cifar10", width=64, epochs=200, batch_size=128, eps=8 / 255, step_size=2 / 255,
                  attack_steps=10, monitor_size=1000, eval_steps=100, snapshot_epochs=(1, 50, 100, 150, 200),
                  # Eq. 10 at the paper's shape sums 8192 standard deviations per layer (512 x 4 x 4), 64 times
                  # the quick model's 128: beta scaled by the same factor keeps beta * L_Cluster at the share of
                  # the loss that trains well on the quick preset (Chapter 5: with 0.1 it starts at ~230x CE)
                  sat_beta=0.003 * 128 / 8192),
}
PRESETS["paper-wrn"] = {**PRESETS["paper"], "model": "wrn-28-10", "mart_beta": 6.0,
                        "sat_beta": 0.003 * 128 / 40960}      # WRN-28-10's last stage: 640 x 8 x 8 per block
PRESETS["paper-cifar100"] = {**PRESETS["paper"], "dataset": "cifar100"}
PRESETS["paper-svhn"] = {**PRESETS["paper"], "dataset": "svhn"}


_CHOICES = {"dataset": DATASETS, "model": MODELS, "method": METHODS, "augment": AUGMENTATIONS, "device": DEVICES,
            "cuda_graphs": CUDA_GRAPHS, "sat_cluster_form": CLUSTER_FORMS}
_POSITIVE = {"width", "epochs", "batch_size", "lr", "monitor_size", "eval_steps"}
_NON_NEGATIVE = {"seed", "momentum", "weight_decay", "train_limit", "eps", "step_size", "attack_steps",
                 "trades_beta", "mart_beta", "awp_gamma", "awp_warmup", "sat_lambda", "sat_beta",
                 "monitor_steps", "eval_size"}


def resolve(preset: str = "quick", **overrides: Any) -> Config:
    """The preset's ``Config`` with ``overrides`` applied and every knob validated.

    ``None`` overrides keep the preset's value, so a notebook's parameters cell can default to ``None``.
    """
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {preset!r}.")
    known = {f.name: f for f in fields(Config)}
    values: dict[str, Any] = {"preset": preset, **PRESETS[preset]}
    for name, value in overrides.items():
        if name not in known:
            raise ConfigError(f"unknown parameter {name!r}; known parameters are {', '.join(sorted(known))}.")
        if value is not None and name != "preset":
            values[name] = value
    for name, value in values.items():
        values[name] = _check(name, value)
    return Config(**values)


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
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(f"{name} must be one of {', '.join(_CHOICES[name])}, got {value!r}.")
    if name in _POSITIVE and value <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}.")
    if name in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{name} must be zero or positive, got {value!r}.")
    if name in ("eps", "step_size") and value > 1:
        raise ConfigError(f"{name} is in pixel units of [0, 1] and must be at most 1, got {value!r}.")
    if name in ("momentum", "lr_decay") and not 0 <= value <= 1:
        raise ConfigError(f"{name} must lie in [0, 1], got {value!r}.")
    return value
