"""The named choices of the book's experiments, each listed once: datasets, training methods, and the
values of the string-valued knobs (Chapter 1's configuration; Chapter 5's methods).

This module sits below everything else (it imports nothing from satlib), so that ``config`` can
validate a knob against the same table that ``data``, ``training`` and ``models`` act on. A new
training method is one new row of ``METHODS``: the configuration accepts it, keys its runs by the
knobs it declares, and the trainer assembles it from its parts.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset: image shape and number of classes."""

    name: str
    channels: int
    size: int
    num_classes: int
    description: str


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 1, 8, 10,
                          "scikit-learn handwritten digits (1,797 8x8 grey images), bundled; quick preset"),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, "CIFAR-10 (50,000 train / 10,000 test 32x32 colour images)"),
    "cifar100": DatasetInfo("cifar100", 3, 32, 100, "CIFAR-100 (50,000 train / 10,000 test, 100 fine classes)"),
    "svhn": DatasetInfo("svhn", 3, 32, 10, "SVHN cropped digits (73,257 train / 26,032 test, 32x32 colour)"),
    "synthetic": DatasetInfo("synthetic", 3, 32, 10, "class-structured random tensors (shape configurable); for "
                             "shape tests and benchmarks only, never a result"),
}


@dataclass(frozen=True)
class Method:
    """One training method as a composition of parts (Chapter 5, "SAT and its combinations").

    ``inner``: the objective the training attack maximises ("ce", "kl", or None for no attack);
    ``outer``: the outer loss ("ce", "trades", "mart"); ``start``: the attack's random start;
    ``sat``: Eq. 7's shift term inside and Eq. 10's L_Cluster outside (``relative_shift``: the shift term
    weighed relative to the base objective, ``FeatureShiftObjective``); ``awp``: adversarial weight
    perturbation around the step; ``knobs``: the configuration knobs of its weights, the only ones
    (besides the shared ones) that key its runs in the store.
    """

    inner: str | None
    outer: str
    start: str
    sat: bool = False
    relative_shift: bool = False
    awp: bool = False
    knobs: tuple[str, ...] = ()


_SAT_KNOBS = ("sat_lambda", "sat_beta", "sat_cluster_form")
_AWP_KNOBS = ("awp_gamma", "awp_warmup")

METHODS: dict[str, Method] = {
    "standard": Method(None, "ce", "none"),
    "pgd-at": Method("ce", "ce", "uniform"),
    "trades": Method("kl", "trades", "normal", knobs=("trades_beta",)),
    "mart": Method("ce", "mart", "uniform", knobs=("mart_beta",)),
    "awp-at": Method("ce", "ce", "uniform", awp=True, knobs=_AWP_KNOBS),
    "sat": Method("ce", "ce", "uniform", sat=True, knobs=_SAT_KNOBS),
    # the shift term relative to the KL: at r = 0 the KL has no gradient and an absolute shift term
    # alone would steer the attack back to x (Chapter 5, "SAT-TRADES' training attack")
    "sat-trades": Method("kl", "trades", "normal", sat=True, relative_shift=True,
                         knobs=("trades_beta", *_SAT_KNOBS)),
    "sat-awp-at": Method("ce", "ce", "uniform", sat=True, awp=True, knobs=(*_SAT_KNOBS, *_AWP_KNOBS)),
}

# The string-valued knobs of ``config.Config`` and their allowed values.
AUGMENTATIONS = ("none", "crop", "crop-flip")
CLUSTER_FORMS = ("paper", "code")        # L_Cluster: Eq. 10 as printed, or the released code's variant
SCHEDULES = ("step", "cosine")           # learning-rate decay: steps at ``lr_decay_at``, or cosine to 0
DEVICES = ("auto", "cpu", "cuda")
CUDA_GRAPHS = ("auto", "on", "off")
