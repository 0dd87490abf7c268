"""The eight training methods as compositions of three parts (Chapter 5, "SAT and its combinations").

=============  ===============  ==============  =========  ========  =====
method         inner objective  outer loss      SAT shift  L_Cluster AWP
=============  ===============  ==============  =========  ========  =====
standard       (none)           CE on clean     -          -         -
pgd-at         CE               CE on adv       -          -         -
trades         KL               TRADES          -          -         -
mart           CE               MART            -          -         -
awp-at         CE               CE on adv       -          -         yes
sat            CE               CE on adv       yes        yes       -
sat-trades     KL               TRADES          yes        yes       -
sat-awp-at     CE               CE on adv       yes        yes       yes
=============  ===============  ==============  =========  ========  =====

The rows live in ``satlib.catalog.METHODS``: a new method is a new row there; ``TrainingObjective``,
``build_step`` and the trainer never change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..attacks import PGD, CrossEntropy, KLDivergence
from ..catalog import METHODS, Method
from ..config import Config
from ..models import FeatureTap, last_stage_blocks
from ..models.folding import FoldedView
from .awp import AWP
from .losses import OUTER_LOSSES, cluster_loss
from .objectives import FeatureShiftObjective


_INNER = {"ce": CrossEntropy, "kl": KLDivergence}


class TrainingObjective:
    """The outer loss of a method on a batch: ``loss, terms, logits_adv = objective(model, x, x_adv, y)``.

    One forward pass on ``x_adv`` gives the logits and (for SAT) the features of ``layers``; a clean
    pass is added only for losses that need it (TRADES, MART).
    """

    def __init__(self, method: Method, cfg: Config, layers: list[str], num_classes: int):
        self.method, self.layers, self.num_classes = method, layers, num_classes
        self.outer = OUTER_LOSSES[method.outer]
        self.weights = {knob: getattr(cfg, knob) for knob in method.knobs}
        self.sat_beta, self.sat_form = cfg.sat_beta, cfg.sat_cluster_form
        self.needs_clean = method.outer in ("trades", "mart")

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor):
        with FeatureTap(model, self.layers if self.method.sat else []) as tap:
            logits_adv = model(x_adv)
        logits_clean = model(x) if self.needs_clean else None
        terms = self.outer(logits_adv, logits_clean, y, **self.weights)
        if self.method.sat:
            terms["cluster"] = self.sat_beta * cluster_loss([tap[l] for l in self.layers], y, self.num_classes,
                                                            form=self.sat_form)
        return sum(terms.values()), terms, logits_adv


@dataclass
class TrainingStep:
    """Everything the trainer needs for one method: the training attack, the loss, optional AWP.

    The attack runs on ``folded`` (the model with its BatchNorms folded into the convolutions, an
    eval-mode twin sharing its weights; ``satlib.models.folding``) when the model allows it, and the
    outer loss under bf16 autocast when ``amp`` (CUDA only; the autocast cache stays off so that the
    step can be recorded as a CUDA graph).
    """

    attack: PGD | None
    objective: TrainingObjective
    awp: AWP | None
    awp_warmup: int
    amp: bool = False
    folded: FoldedView | None = None

    def variant(self, epoch: int) -> bool:
        """The step's only data-independent branch: is AWP active in ``epoch``?"""
        return self.awp is not None and epoch > self.awp_warmup

    def __call__(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 epoch: int, plain: nn.Module | None = None):
        """One optimisation step; returns (loss, terms, logits on the training inputs), all detached.

        ``model`` computes the training loss (it may be a DistributedDataParallel wrapper); ``plain``
        (default ``model``) is the unwrapped model AWP's direction uses, so its extra backward pass
        never reaches the data-parallel gradient reducer.
        """
        plain = model if plain is None else plain
        x_adv = x
        if self.attack is not None:
            x_adv = self.attack(self.folded.refresh() if self.folded is not None else plain, x, y)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            applied = []
            if self.variant(epoch):
                applied = self.awp.perturb(plain, lambda: self.objective(plain, x, x_adv, y)[0])
            loss, terms, logits = self.objective(model, x, x_adv, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        AWP.restore(applied)
        return loss.detach(), {k: v.detach() for k, v in terms.items()}, logits.detach()


def sat_layers(model: nn.Module) -> list[str]:
    """SAT's layers: the residual blocks of the last stage (Sec. 6.1; ``layer4.0``, ``layer4.1``)."""
    return last_stage_blocks(model)


def build_step(cfg: Config, model: nn.Module, num_classes: int, *, amp: bool = False) -> TrainingStep:
    """Assemble the training step of ``cfg.method`` for ``model``."""
    method = METHODS[cfg.method]
    layers = sat_layers(model) if method.sat else []
    attack = None
    if method.inner is not None:
        inner = _INNER[method.inner]()
        if method.sat:
            inner = FeatureShiftObjective(inner, layers, cfg.sat_lambda, relative=method.relative_shift)
        attack = PGD(cfg.eps, steps=cfg.attack_steps, step_size=cfg.step_size, start=method.start,
                     objective=inner, amp=amp)
    awp = AWP(cfg.awp_gamma) if method.awp else None
    folded = FoldedView.of(model) if attack is not None and cfg.fold_bn else None
    return TrainingStep(attack, TrainingObjective(method, cfg, layers, num_classes), awp, cfg.awp_warmup, amp=amp,
                        folded=folded)
