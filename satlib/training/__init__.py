"""Training: the method table, their losses, AWP and the one trainer (Chapters 1, 2 and 5)."""
from .awp import AWP
from .losses import adversarial_ce, cluster_loss, mart_loss, trades_loss
from .methods import METHODS, Method, TrainingObjective, TrainingStep, build_step, sat_layers
from .objectives import FeatureShiftObjective, feature_shift
from .trainer import EpochEnd, TrainingDiverged, model_for, resolve_device, train

__all__ = ["AWP", "EpochEnd", "FeatureShiftObjective", "METHODS", "Method", "TrainingDiverged", "TrainingObjective",
           "TrainingStep", "adversarial_ce", "build_step", "cluster_loss", "feature_shift", "mart_loss",
           "model_for", "resolve_device", "sat_layers", "train", "trades_loss"]
