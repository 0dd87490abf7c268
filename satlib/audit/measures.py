"""What ``satlib audit`` measures on one model, each part with the library function a chapter teaches.

- robust accuracy under the book's attacks and the per-sample worst case (``evaluation.correctness``;
  Chapters 1 and 4), every verdict in fp32 in batches that fill the device;
- clustering accuracy of every residual block, clean and under PGD and LAFEAT, with centroids of the
  clean training features (``clustering``; Chapters 2 and 4);
- the feature margin rho(x), the certified radius and the attack-based radii of Theorem 2
  (``bound``; Chapter 6), where the model's last layer is a linear layer named ``linear``;
- the gradient-masking checks (``report.checks``; Chapter 5).

Every part is kept in a store (``satlib.artifacts.Artifacts``) under a name made of its settings as
soon as it is computed, so an interrupted audit resumes where it stopped. The adversarial examples of
PGD and LAFEAT are kept too: clustering accuracy under those attacks reads them back.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from .. import bound
from ..attacks import Attack, TensorStore, fit_heads, make_attack
from ..clustering import class_centroids, clustering_accuracy
from ..config import resolve
from ..data import ArrayDataset
from ..batching import batches
from ..evaluation import correctness, summarize
from ..models import residual_blocks
from ..models.resnet import BasicBlock
from ..models.wrn import WideBlock
from ..precision import exact_fp32
from ..report.checks import eps_sweep, masking_checks

PRESET_OF = {"digits": "quick", "cifar10": "paper", "cifar100": "paper-cifar100", "svhn": "paper-svhn"}
KEPT = ("pgd", "lafeat")       # attacks whose adversarial examples are kept, for clustering under them
UNDER = ("PGD", "LAFEAT")      # the attacks clustering accuracy is measured under (Chapter 4, Figure 3)


def defaults(dataset: str) -> dict[str, float]:
    """The evaluation of the dataset's preset (digits: ``quick``, else the paper's): ``eps``, ``steps``,
    ``restarts`` (one on the digits, as ``satlib evaluate`` and the book's tables; else five) and
    ``val_size`` (the validation images the book's runs hold out of the training split)."""
    if dataset not in PRESET_OF:
        raise ValueError(f"unknown dataset {dataset!r}; the audit knows {', '.join(PRESET_OF)}")
    cfg = resolve(PRESET_OF[dataset])
    return {"eps": cfg.eps, "steps": cfg.eval_steps, "restarts": 1 if cfg.preset == "quick" else 5,
            "val_size": cfg.val_size}


def key(*parts: object) -> str:
    """A short name for a kept result: a hash of every setting it depends on."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def book_attacks(names: Sequence[str], *, eps: float, steps: int, restarts: int, seed: int,
                 heads: Callable[[], Mapping[str, nn.Module]] | None, store: TensorStore | None) -> dict[str, Attack]:
    """The evaluation attacks by name (``satlib.attacks.ATTACKS``), as ``satlib evaluate`` builds them; PGD and
    LAFEAT keep their adversarial examples in ``store``."""
    built = (make_attack(name, eps=eps, steps=steps, restarts=restarts, seed=seed, heads=heads,
                         store=store if name.lower() in KEPT else None) for name in names)
    return {a.name: a for a in built}


def robust_accuracy(model: nn.Module, data: ArrayDataset, attacks: Mapping[str, Attack], *, seed: int,
                    store, batch_size: int, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(table, correct)``: the accuracy table of ``satlib.evaluation.evaluate`` and its per-sample columns
    (clean, each attack, ``worst case``), each column kept in ``store`` as soon as it is computed."""
    correct = correctness(model, data, attacks, seed=seed, cache=store, tag="audit", batch_size=batch_size,
                          progress=progress)
    table = summarize(correct)
    table["seconds"] = table["attack"].map(correct.attrs["seconds"]).fillna(0.0)
    return table, correct.assign(**{"worst case": correct.all(axis=1)})


def heads_for(model: nn.Module, train: Callable[[], ArrayDataset], *, seed: int, store, epochs: int | None
              ) -> Callable[[], dict[str, nn.Module]]:
    """LAFEAT's heads on the training split (``fit_heads``), fitted when first needed and kept in ``store``."""
    options = {} if epochs is None else {"epochs": epochs}
    cache = None if store is None else store.cached_tensors
    return lambda: fit_heads(model, train, seed=seed, cache=cache, **options)


def has_blocks(model: nn.Module) -> bool:
    """Whether ``satlib`` can name the model's layers (residual blocks of the book's two architectures)."""
    return any(isinstance(m, (BasicBlock, WideBlock)) for m in model.modules())


def clustering(model: nn.Module, train: Callable[[], ArrayDataset], test: ArrayDataset,
               attacks: Mapping[str, Attack | None], *, store, batch_size: int) -> pd.DataFrame:
    """Clustering accuracy of every residual block (Definition 1 with L2; Chapter 2) on ``test``, clean and
    under each attack, with the centroids of the clean training features: one row per (attack, layer)."""
    layers = residual_blocks(model)

    def centroids() -> dict[str, torch.Tensor]:
        return class_centroids(model, train(), layers, batch_size=batch_size)

    mus = centroids() if store is None else store.cached_tensors(f"centroids-{key(layers)}", centroids)
    frames = []
    for name, attack in attacks.items():
        def compute(attack=attack) -> pd.DataFrame:
            with exact_fp32(next(model.parameters()).device):
                return clustering_accuracy(model, test, mus, attack=attack, batch_size=batch_size)

        name_key = f"clustering-{key(layers, repr(attack), test.name, len(test))}"
        frame = compute() if store is None else store.cached_frame(name_key, compute, columns=("clu_acc", "acc"))
        frames.append(frame.assign(attack=name, depth=range(1, len(frame) + 1)))
    return pd.concat(frames, ignore_index=True)[["attack", "layer", "depth", "clu_acc", "acc"]]


def has_linear_head(model: nn.Module) -> bool:
    """Whether Theorem 2 applies as ``satlib.bound`` computes it: a last linear layer named ``linear``."""
    return isinstance(getattr(model, "linear", None), nn.Linear)


def lipschitz(model: nn.Module, input_shape: Sequence[int], *, stretch: float = 1.0) -> bound.LipschitzBound:
    """``bound.lipschitz_bound`` of the model, times ``stretch`` (an input normalisation's ``max 1 / std``)."""
    lip = bound.lipschitz_bound(model, tuple(input_shape))
    return dataclasses.replace(lip, l2=lip.l2 * stretch, inf_to_2=lip.inf_to_2 * stretch)


def radii(model: nn.Module, data: ArrayDataset, *, eps: float, lip: bound.LipschitzBound | None, seed: int,
          iters: int = 8, steps: int = 10, batch_size: int = 500) -> pd.DataFrame:
    """Per sample: the feature margin ``rho`` (u = v = 2), the ``certified`` radius min(eps, rho / Lip) where a
    Lipschitz bound is known (``bound.certify``: float64, with the check that margin PGD inside it never
    flips the label), and the attack-based upper estimates ``empirical`` and ``flip`` (``bound.estimate_radii``)."""
    if lip is not None:
        table = bound.certify(model, data, eps=eps, lip=lip, batch_size=batch_size, seed=seed)
        low = torch.tensor(table["certified"].to_numpy())
    else:
        table = _margins(model, data, batch_size)
        low = None
    rho = torch.tensor(table["rho"].to_numpy())
    estimates = bound.estimate_radii(model, data, rho, eps=eps, lo=low, iters=iters, steps=steps,
                                     batch_size=batch_size, seed=seed)
    return table.merge(estimates, on="sample")


def _margins(model: nn.Module, data: ArrayDataset, batch_size: int) -> pd.DataFrame:
    """``sample, label, pred, correct, rho`` without a Lipschitz bound (the feature margin alone)."""
    device = next(model.parameters()).device
    weight, rows = bound.last_linear(model).weight.detach(), []
    with torch.no_grad(), exact_fp32(device):
        for x, y in batches(data.to(device), batch_size, shuffle=False):
            _, z = bound.features_and_logits(model.eval(), x)
            rows.append(pd.DataFrame({"label": y.cpu(), "pred": z.argmax(1).cpu(),
                                      "rho": bound.feature_margin(z, weight).cpu()}))
    table = pd.concat(rows, ignore_index=True)
    table.insert(0, "sample", range(len(table)))
    table.insert(3, "correct", table["pred"] == table["label"])
    return table


def checks(model: nn.Module, data: ArrayDataset, table: pd.DataFrame, *, eps: float, seed: int, store,
           batch_size: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(sweep, checks)``: PGD-10 accuracy over ``EPS_FACTORS`` times eps and the gradient-masking checks,
    decided with the clean, FGSM, BIM and PGD accuracies of ``table`` (no surrogate model: no transfer check)."""
    def compute() -> pd.DataFrame:
        return eps_sweep(model, data, eps, seed=seed, batch_size=batch_size)

    sweep = compute() if store is None else store.cached_frame(f"sweep-{key(eps, seed, data.name, len(data))}",
                                                               compute, columns=("eps", "accuracy"))
    acc = table.set_index("attack")["accuracy"]
    return sweep, masking_checks(clean=acc["clean"], sweep=sweep, fgsm=acc["FGSM"], bim=acc["BIM"], pgd=acc["PGD"],
                                 num_classes=data.num_classes)
