"""A chapter's setup in one call, and the paper's tables beside ours (Chapter 1, "Running the book").

Every chapter opens with a cell of parameters that papermill may override (``None``: "the default").
``chapter_config`` validates them all at once, before any work starts: the configuration knobs
through ``satlib.config.resolve``, the chapter's own parameters by the type of their default,
each bad value stopped by one sentence (``ConfigError``) that names it. It also tells whether the
chapter runs in its default setting, the one whose prose states the outcomes, and hands out the
``Verdicts`` ledger of that setting (``satlib.report.ledger``).

``paper_table`` reads the paper's Tables 1 and 2 (``data/``) with the book's column names.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from ..catalog import METHODS
from ..config import Config, ConfigError, resolve
from .ledger import Verdicts, say, setting_name

DATA = Path(__file__).resolve().parents[2] / "data"
# The paper's column of each of the book's columns (the attack names of ``satlib.evaluation.evaluate``).
PAPER_COLUMNS = {
    "table1": {"clean": "clean", "FGSM": "fgsm", "BIM": "bim100", "PGD": "pgd100", "CW-inf": "cw_inf",
               "AutoAttack": "autoattack100", "LAFEAT": "lafeat100"},
    "table2": {"PGD": "pgd1000", "AutoAttack": "autoattack1000", "LAFEAT": "lafeat1000"},
}


@dataclass(frozen=True)
class ChapterConfig:
    """A chapter's validated setting: ``cfg``, its own parameters ``params`` (also readable as attributes,
    ``ch.seeds``), ``default`` (every parameter at its default on the prose's preset) and ``verdicts``."""

    cfg: Config
    params: Mapping[str, Any]
    default: bool
    verdicts: Verdicts

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["params"][name]
        except KeyError:
            raise AttributeError(f"the chapter has no parameter {name!r}") from None

    def expect(self, holds: bool, claim: str) -> None:
        """An empirical claim of the text: its outcome printed in every setting, asserted only in the
        default one, whose prose states it (so other parameters run to the end and report)."""
        say(f"{'holds' if holds else 'DOES NOT HOLD'}: {claim}")
        assert holds or not self.default, f"the text says: {claim}"


def chapter_config(preset: str, knobs: Mapping[str, Any] | None = None, *, defaults: Mapping[str, Any] | None = None,
                   minimum: Mapping[str, float] | None = None, choices: Mapping[str, Sequence[str]] | None = None,
                   prose_preset: str = "quick", **params: Any) -> ChapterConfig:
    """Validate a chapter's parameters in one call; ``None`` stands for a parameter's default.

    ``knobs`` are the chapter's configuration knobs (``epochs``, ``seed``, ``eval_size``, ...), checked
    by ``resolve(preset, ...)``; ``defaults`` may give a knob the chapter's own default
    (``eval_size=200``), else the preset's value stands. ``params`` are the chapter's own parameters;
    each needs its default in ``defaults``, whose type sets the rule: an integer default asks for an
    integer of at least ``minimum[name]`` (1 if not given), a float for a positive number, a bool for
    True or False, a list for a list of method names (``satlib.catalog.METHODS``, or ``choices[name]``;
    a comma-separated string is accepted), and ``None`` for a positive integer or None (an iteration
    count that defaults to the preset's). ``default`` is True when the chapter runs on
    ``prose_preset`` with every knob and parameter equal to its default.

    >>> ch = chapter_config("quick", dict(epochs=None, eval_size=None), defaults=dict(eval_size=200, seeds=2),
    ...                     seeds=None)
    >>> ch.cfg.eval_size, ch.seeds, ch.default
    (200, 2, True)
    """
    knobs, defaults = dict(knobs or {}), dict(defaults or {})
    minimum, choices = dict(minimum or {}), dict(choices or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"chapter parameter(s) {', '.join(unknown)} have no default; give them one in defaults=")
    knob_defaults = {k: v for k, v in defaults.items() if k not in params}
    cfg = resolve(preset, **{**knob_defaults, **{k: v for k, v in knobs.items() if v is not None}})
    rules = {k: (defaults[k], minimum.get(k, 1), choices.get(k)) for k in params}
    extras = {k: _check(k, defaults[k] if params[k] is None else params[k], *rule) for k, rule in rules.items()}
    default = (preset == prose_preset and cfg == resolve(preset, **knob_defaults)
               and all(extras[k] == _check(k, defaults[k], *rule) for k, rule in rules.items()))
    setting = {**{k: getattr(cfg, k) for k in knobs}, **extras}
    return ChapterConfig(cfg, extras, default, Verdicts(setting_name(preset, setting, default), default=default))


def _check(name: str, value: Any, default: Any, low: float, allowed: Sequence[str] | None) -> Any:
    """One chapter parameter against the rule its default implies (see ``chapter_config``)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}.")
        return value
    if isinstance(default, (list, tuple)):
        allowed = list(METHODS) if allowed is None else list(allowed)
        names = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if (not isinstance(names, (list, tuple)) or not all(isinstance(v, str) for v in names)
                or not set(names) <= set(allowed)):
            raise ConfigError(f"{name} must be a list (or comma-separated string) of {', '.join(allowed)}, "
                              f"got {value!r}.")
        return list(names)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ConfigError(f"{name} must be a positive number, got {value!r}.")
        return float(value)
    if default is None and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < (1 if default is None else low):
        kind = "a positive integer or None" if default is None else f"an integer >= {low:g}"
        raise ConfigError(f"{name} must be {kind}, got {value!r}.")
    return value


def tag(*parts: Any) -> str:
    """A short name for a chapter's cached artifact: a hash of every parameter of the analysis."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:10]


def paper_table(name: str, *, model: str = "ResNet-18", dataset: str = "CIFAR-10") -> pd.DataFrame:
    """The paper's ``table1`` or ``table2`` (percent, as printed; ``data/README.md`` gives the provenance) for
    one model and dataset: one row per method (the book's names, e.g. ``sat-trades``), the book's columns."""
    if name not in PAPER_COLUMNS:
        raise ValueError(f"the paper's tables here are {', '.join(PAPER_COLUMNS)}, got {name!r}")
    table = pd.read_csv(DATA / f"paper_{name}.csv")
    rows = table[(table.model == model) & (table.dataset == dataset)]
    if rows.empty:
        pairs = sorted(set(zip(table.dataset, table.model)))
        raise ValueError(f"the paper's {name} has no rows for {model} on {dataset}; it has {pairs}")
    columns = PAPER_COLUMNS[name]
    frame = rows.assign(method=rows.method.str.lower()).set_index("method")[list(columns.values())]
    return frame.set_axis(list(columns), axis=1)
