"""satlib audit: the API on a tiny model, checkpoint loading, normalised inputs, resuming, the command line."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import satlib
import satlib.evaluation
from satlib.__main__ import main
from satlib.attacks import make_attack
from satlib.audit import AuditError, audit
from satlib.audit.loading import load_weights
from satlib.checkpoints import CheckpointError
from satlib.data import load
from satlib.evaluation import evaluate
from satlib.models import build_model

N = 32
SETTINGS = dict(n=N, steps=2, restarts=1, attacks=("fgsm", "bim", "pgd"), radius_samples=8, seed=0)
FIGURES = ("accuracy_by_attack.png", "accuracy_vs_eps.png", "clustering_by_layer.png", "radii.png")
FACTORY = '''import torch
from torch import nn
from satlib.models import build_model


class Normalised(nn.Module):
    """The tiny ResNet behind an input that undoes (x - 0.5) / 0.5: it expects normalised images."""

    def __init__(self):
        super().__init__()
        self.net = build_model("resnet18", num_classes=10, in_channels=1, width=8)

    def forward(self, x):
        return self.net(x * 0.5 + 0.5)


def normalised():
    return Normalised()
'''


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", num_classes=10, in_channels=1, width=8).eval()


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    return audit(tiny(), "digits", out=out, **SETTINGS), out


def test_api_measures_every_part_and_writes_the_report(audited):
    result, out = audited
    acc = result.accuracy.set_index("attack")["accuracy"]
    assert list(acc.index) == ["clean", "FGSM", "BIM", "PGD", "worst case"]
    assert acc["worst case"] <= acc.drop("worst case").min()
    assert set(result.clustering["attack"]) == {"clean", "PGD"} and len(result.clustering) == 2 * 8
    assert len(result.radii) == 8 and {"rho", "certified", "empirical"} <= set(result.radii.columns)
    assert list(result.checks["check"]) == ["eps-zero", "vanishes", "monotone", "iterative", "transfer"]
    for name in ("report.md", "report.html", "per_sample.csv", "radii.csv", "clustering.csv", *FIGURES):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"]["PGD"] == pytest.approx(acc["PGD"])
    assert all(f"]({f})" in (out / "report.md").read_text() for f in FIGURES)
    assert all(f in (out / "report.html").read_text() for f in FIGURES)


def test_audit_equals_evaluate_with_the_same_seed(audited):
    result, _ = audited
    attacks = [make_attack(a, eps=0.2, steps=2, restarts=1, seed=0) for a in SETTINGS["attacks"]]
    table = evaluate(tiny(), load("digits", "test").subset(N), attacks, seed=0)
    assert table["accuracy"].tolist() == result.accuracy["accuracy"].tolist()


def test_normalised_inputs_give_the_same_accuracies(tmp_path, monkeypatch, audited):
    (tmp_path / "normalised_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    from satlib.audit.loading import build_architecture
    from satlib.catalog import DATASETS
    model = build_architecture("normalised_factory:normalised", DATASETS["digits"], {})
    model.net.load_state_dict(tiny().state_dict())
    result = audit(model.eval(), "digits", normalization=([0.5], [0.5]), **SETTINGS)
    assert result.accuracy["accuracy"].tolist() == audited[0].accuracy["accuracy"].tolist()
    assert result.radii is None              # its last layer is not named ``linear``: Theorem 2 is skipped


def test_nested_and_prefixed_checkpoints_load(tmp_path):
    weights = tiny().state_dict()
    for prefix in ("module.", "_orig_mod.", "_orig_mod.module."):
        path = tmp_path / "nested.pt"
        torch.save({"epoch": 3, "state_dict": {"model": {prefix + k: v for k, v in weights.items()}}}, path)
        loaded = load_weights(path)
        assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_bad_checkpoints_get_one_sentence(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(tiny().state_dict(), good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:4000])
    torch.save(tiny(), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="damaged, cut short"):
        load_weights(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="pickled model; save model.state_dict"):
        load_weights(tmp_path / "whole.pt")
    from satlib.audit.loading import load_model
    from satlib.catalog import DATASETS
    with pytest.raises(AuditError, match="missing keys block1.0.*unexpected keys bn1.weight"):
        load_model(good, "wrn-28-10", DATASETS["digits"])


@pytest.mark.parametrize("name, model", [("cut.pt", "resnet18"), ("whole.pt", "resnet18"), ("good.pt", "wrn-28-10"),
                                         ("good.pt", "no_such_module:factory")])
def test_command_line_errors_are_one_line_and_fail(tmp_path, capsys, name, model):
    good = tmp_path / "good.pt"
    torch.save(tiny().state_dict(), good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:4000])
    torch.save(tiny(), tmp_path / "whole.pt")
    code = main(["audit", "--checkpoint", str(tmp_path / name), "--model", model, "--dataset", "digits",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_command_line_writes_the_report(tmp_path, capsys, audited):
    path = tmp_path / "model.pt"
    torch.save({"model": {"module." + k: v for k, v in tiny().state_dict().items()}}, path)
    code = main(["audit", "--checkpoint", str(path), "--model", "resnet18", "--dataset", "digits", "--n", str(N),
                 "--attacks", "fgsm,bim,pgd", "--steps", "2", "--restarts", "1", "--out", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "report.html").exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["accuracy"] == json.loads((audited[1] / "summary.json").read_text())["accuracy"]
    assert callable(satlib.audit)


def test_interrupted_audit_recomputes_only_what_was_not_kept(tmp_path, monkeypatch):
    real, calls = satlib.evaluation.correct_mask, []

    def stops_at_pgd(model, data, attack=None, **options):
        if attack is not None and attack.name == "PGD":
            raise KeyboardInterrupt
        return real(model, data, attack, **options)

    def counted(model, data, attack=None, **options):
        calls.append(getattr(attack, "name", "clean"))
        return real(model, data, attack, **options)

    monkeypatch.setattr(satlib.evaluation, "correct_mask", stops_at_pgd)
    with pytest.raises(KeyboardInterrupt):
        audit(tiny(), "digits", out=tmp_path, **SETTINGS)
    kept = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("cache/*/*")}
    assert len(kept) == 3 and all(name.startswith("correct-") for name in kept)     # clean, FGSM, BIM
    monkeypatch.setattr(satlib.evaluation, "correct_mask", counted)
    audit(tiny(), "digits", out=tmp_path, **SETTINGS)
    assert calls == ["PGD"]
    assert all(p.stat().st_mtime_ns == kept[p.name] for p in tmp_path.glob("cache/*/*") if p.name in kept)
