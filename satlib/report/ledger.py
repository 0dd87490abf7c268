"""The paper's claims and the book's verdicts on them (the appendix "The paper, checked").

``CLAIMS`` lists what the paper claims (abstract, Sections 3 to 6, its tables and figures), each in
the book's words and with the chapter that tests it. A chapter decides a claim with
``Verdicts.check``: it computes whether the claim holds in the chapter's setting, records the verdict
with the measured numbers in the run store, prints it, and asserts it only for the setting whose
prose states the outcome (the default run), so that other parameter values run to the end and
report what they found. The appendix reads every recorded verdict back with ``read``.
"""
from __future__ import annotations

import hashlib
import json
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..runs import runs_root

STATUSES = ("reproduced", "partly reproduced", "not reproduced", "not testable at this scale")


@dataclass(frozen=True)
class Claim:
    """A claim of the paper: where it is made, what it says (in the book's words), which chapter tests it."""

    where: str
    statement: str
    chapter: str


CLAIMS: dict[str, Claim] = {c_key: c for c_key, c in [
    ("shift-follows-gradient", Claim("Sec. 3.1, Fig. 1", "Under PGD the shift of every layer's features points "
     "along that layer's gradient of the cross-entropy (positive mean cosine at every iteration).",
     "01_adversarial_training")),
    ("lafeat-beats-pgd", Claim("Sec. 1, Sec. 4", "An intermediate-layer attack (LAFEAT) finds more adversarial "
     "examples on an adversarially trained model than output-layer attacks.", "04_intermediate_layer_attacks")),
    ("clustering-rises-with-depth", Claim("Sec. 3.2, Fig. 2", "Clustering accuracy rises with depth until it "
     "is comparable to the classification accuracy.", "02_clustering_effect")),
    ("clustering-all-defences", Claim("Fig. 2", "The clustering effect holds for PGD-AT, TRADES and MART "
     "models alike.", "02_clustering_effect")),
    ("clustering-during-training", Claim("Fig. 2", "The clustering effect is present throughout training, "
     "at every epoch shown.", "02_clustering_effect")),
    ("ib-minima", Claim("Sec. 3.3, Cases 1-3", "For gamma > 1 the IB loss is minimised by class-wise Dirac "
     "features (Minimum 2), for gamma < 1 by a constant (Minimum 1).", "03_information_bottleneck")),
    ("proposition-2", Claim("Prop. 2", "K log 2 pi + tr(Sigma) / 2 bounds the entropy of a K-dimensional "
     "Gaussian.", "03_information_bottleneck")),
    ("theorem-1", Claim("Thm. 1", "Problems (5) and (6), centroid separation and overlap with a variance "
     "penalty, have the same minimiser.", "03_information_bottleneck")),
    ("ila-keeps-clustering", Claim("Sec. 4, Fig. 3", "ILA damages clustering accuracy less than OLA through "
     "every residual block, yet lowers classification accuracy more.", "04_intermediate_layer_attacks")),
    ("ila-breaks-clustering-effect", Claim("Sec. 4, Fig. 3", "Under ILA the last layer's clustering accuracy "
     "does not approach the classification accuracy, unlike under OLA.", "04_intermediate_layer_attacks")),
    ("ila-smaller-shift", Claim("Sec. 4, Fig. 4", "ILA shifts the last layer's features less than OLA.",
     "04_intermediate_layer_attacks")),
    ("lambda-search", Claim("Sec. 6.1", "The greedy search on the PGD-AT model finds SAT's lambda "
     "(the released code's 0.087, about 0.98 per sample at batch 128).", "05_sat")),
    ("sat-shift-between", Claim("Sec. 6.2, Fig. 5", "SAT's training perturbations shift the features between "
     "OLA's and ILA's.", "05_sat")),
    ("sat-beats-pgd-at", Claim("Table 1, abstract", "SAT is more robust than PGD-AT, above all under LAFEAT.",
     "05_sat")),
    ("sat-clean-comparable", Claim("Table 1", "SAT keeps a clean accuracy comparable to PGD-AT's.", "05_sat")),
    ("sat-trades-beats-trades", Claim("Table 1", "SAT-TRADES is more robust than TRADES under LAFEAT.", "05_sat")),
    ("sat-awp-beats-awp", Claim("Table 1", "SAT-AWP-AT is more robust than AWP-AT under LAFEAT.", "05_sat")),
    ("converged-attacks", Claim("Table 2", "Converged attacks (1000 iterations) change SAT's robust accuracy "
     "little.", "05_sat")),
    ("sat-merges-shifts", Claim("Sec. 6.2, Fig. 6", "On the SAT model ILA and OLA shift the features alike.",
     "05_sat")),
    ("sat-clustering-under-ila", Claim("Sec. 6.2, Fig. 7", "The SAT model keeps the clustering effect at its "
     "last layer under ILA.", "05_sat")),
    ("cluster-loss-converges", Claim("Sec. 6.2, Fig. 8", "L_Cluster converges quickly without hindering the "
     "cross-entropy.", "05_sat")),
    ("generated-data", Claim("Table 3", "With 100K to 1M generated images SAT-TRADES beats TRADES under LAFEAT.",
     "05_sat")),
    ("theorem-2", Claim("Thm. 2", "No perturbation within the radius Delta changes the label.",
     "06_robustness_bound")),
    ("bound-and-cluster-loss", Claim("Sec. 5.3", "Tight class clusters keep the feature shift small (triangle "
     "inequality), linking the bound to L_Cluster.", "06_robustness_bound")),
]}


@dataclass(frozen=True)
class Verdict:
    """What a chapter found for one claim in one setting."""

    claim: str
    status: str
    measured: str
    test: str
    setting: str


def setting_name(preset: str, params: dict[str, Any], default: bool) -> str:
    """``quick`` for a chapter's default run, else the preset and a hash of the parameters that differ."""
    if default:
        return preset
    return f"{preset}-{hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]}"


PAGE_WIDTH = 88   # characters of a code or output line that fit the book's text column


def say(line: str) -> None:
    """Print a verdict or a claim's outcome wrapped to the page's width (continuation lines indented)."""
    print(textwrap.fill(line, PAGE_WIDTH, subsequent_indent="    ", break_on_hyphens=False))


def ledger_dir(setting: str, root: str | Path | None = None) -> Path:
    return runs_root(root) / "ledger" / setting


class Verdicts:
    """A chapter's verdicts in one setting; ``default`` marks the setting whose prose states the outcomes."""

    def __init__(self, setting: str, *, default: bool, root: str | Path | None = None):
        self.setting, self.default, self.root = setting, default, root

    def check(self, claim: str, status: str, *, measured: str, test: str, expected: str | None = None) -> None:
        """Record ``status`` for ``claim`` and print it; on the default setting, assert that it is
        ``expected`` (the prose's). Returns nothing, so a chapter's page shows the printed line only."""
        if claim not in CLAIMS:
            raise KeyError(f"unknown claim {claim!r}; the ledger knows {', '.join(CLAIMS)}")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        verdict = Verdict(claim, status, measured, test, self.setting)
        path = ledger_dir(self.setting, self.root) / f"{claim}.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(verdict), indent=1))
        except OSError as err:            # a read-only store: the verdict is still printed and checked
            print(f"(verdict not stored: {err})")
        say(f"{CLAIMS[claim].where}: {status} ({measured})")
        if self.default and expected is not None:
            assert status == expected, f"{claim}: the text says '{expected}', the run found '{status}' ({measured})"


def read(setting: str, root: str | Path | None = None) -> pd.DataFrame:
    """Every claim with its recorded verdict in ``setting`` (NaN where no chapter recorded one yet)."""
    folder = ledger_dir(setting, root)
    found = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")} if folder.is_dir() else {}
    rows = [{"claim": key, **asdict(claim), **{k: found.get(key, {}).get(k) for k in ("status", "measured", "test")}}
            for key, claim in CLAIMS.items()]
    return pd.DataFrame(rows)
