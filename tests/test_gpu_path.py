"""The GPU path: tested on a CPU where it can be, and on CUDA where a GPU exists (tests marked ``gpu``).

- BatchNorm folding: the folded twin computes the eval-mode logits and features, follows weight
  updates, and the training attack through it finds the same perturbations;
- ``GraphedStep``'s plumbing (static buffers, the partial last batch run eagerly, the learning rate
  as a device tensor, one graph per AWP phase) trains to exactly the eager loop's weights on a CPU;
- ``FeatureTap`` explains, instead of returning nothing, when a compiled model skipped its hooks,
  and SAT's steps see their features after untapped calls of the same model;
- on CUDA: a recorded step reads the schedule's current learning rate, graphed training is as good
  as eager, and fp32 evaluation agrees with the CPU's.
"""
import copy

import pytest
import torch
from torch import nn

from satlib.attacks import BIM, PGD
from satlib.config import resolve
from satlib.evaluation import correct_mask
from satlib.models import FeatureTap, build_model
from satlib.models.folding import FoldedView
from satlib.runs import RunStore, safe_load
from satlib.training import build_step, train
from satlib.training.graphs import GraphedStep, device_learning_rate

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _with_statistics(name, **kw):
    """A model whose BatchNorms hold non-trivial running statistics and affine weights."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, **kw).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32) * 2)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("name, kw", [("resnet18", dict(width=8)), ("wrn-28-10", {})])
def test_folded_view_computes_eval_mode_logits_and_features(name, kw):
    model = _with_statistics(name, **kw)
    view = FoldedView.of(model)
    layer = "layer4.1" if name == "resnet18" else "block3.3"
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad(), FeatureTap(model, [layer]) as tap, FeatureTap(view.refresh(), [layer]) as folded_tap:
        logits, folded_logits = model(x), view.module(x)
        assert torch.allclose(folded_tap[layer], tap[layer], atol=1e-4, rtol=1e-4)
    assert torch.allclose(folded_logits, logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():                       # a weight update reaches the view at its next refresh
        model.conv1.weight.mul_(1.5)
        assert not torch.allclose(view.module(x), model(x), atol=1e-4)
        assert torch.allclose(view.refresh()(x), model(x), atol=1e-4, rtol=1e-4)


def test_folded_training_attack_finds_the_same_perturbations(trained_digits_model, digits_test):
    model = trained_digits_model
    x, y = digits_test.x[:128], digits_test.y[:128]
    for method in ("pgd-at", "sat", "trades"):
        step = build_step(resolve("quick", method=method, width=8), model, 10)
        assert step.folded is not None
        torch.manual_seed(1)
        plain = step.attack(model, x, y)
        torch.manual_seed(1)
        folded = step.attack(step.folded.refresh(), x, y)
        same = (plain == folded).float().mean().item()
        assert same > 0.99, f"{method}: only {same:.4f} of the pixels agree between folded and plain attacks"


class _Branching(nn.Module):
    """A model torch.fx cannot trace (control flow on a tensor's value): it is attacked unfolded."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 10)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if h.mean() > 1e9:
            h = -h
        return self.fc(h.mean((2, 3)))


def test_an_untraceable_model_is_attacked_unfolded():
    model = _Branching()
    step = build_step(resolve("quick", method="pgd-at"), model, 10)
    assert FoldedView.of(model) is None and step.folded is None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, _, _ = step(model, opt, torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)), 1)
    assert torch.isfinite(loss)


TINY = dict(width=4, epochs=3, train_limit=200, batch_size=64, attack_steps=2, val_size=64, monitor_steps=2,
            lr_decay_at=(0.34,))


@pytest.mark.parametrize("method, extra", [("pgd-at", {}), ("awp-at", {"awp_warmup": 1}), ("sat-trades", {})])
def test_graphed_plumbing_trains_to_the_eager_weights(tmp_path, method, extra):
    """200 images in batches of 64: three full batches per epoch go through the static buffers (the first
    two eagerly, as warm-up) and the partial one runs eagerly; the learning rate drops after epoch 1
    and AWP switches on after epoch 1. Any slip (a dropped batch, a stale lr, stale outputs) changes the weights."""
    runs = {}
    for graphs in ("on", "off"):
        cfg = resolve("quick", method=method, cuda_graphs=graphs, **TINY, **extra)
        runs[graphs] = train(cfg, store=RunStore(tmp_path / graphs), progress=False)
    a, b = (safe_load(r.model_path) for r in runs.values())
    assert all(torch.equal(a[k], b[k]) for k in a), "the static-buffer path trained to other weights"
    ma, mb = (r.metrics() for r in runs.values())
    assert ma["loss"].tolist() == mb["loss"].tolist() and ma["lr"].tolist() == mb["lr"].tolist()
    assert ma["lr"].iloc[-1] < ma["lr"].iloc[0]


def test_feature_tap_explains_a_compiled_model():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, width=4).eval()
    compiled = torch.compile(model, backend="eager")
    x = torch.rand(4, 1, 8, 8)
    compiled(x)                                  # compiled without hooks: later taps are skipped
    with FeatureTap(compiled, ["layer4.0"]) as tap:
        compiled(x)
        with pytest.raises(KeyError, match="recorded nothing.*torch.compile"):
            tap["layer4.0"]
    with FeatureTap(model, ["layer4.0"]) as tap:     # the trainer never compiles: its model always records
        model(x)
        assert tap["layer4.0"].shape[0] == 4


def test_sat_steps_see_their_features_after_untapped_calls():
    """SAT-TRADES' clean pass and a PGD-AT step before SAT run the model outside any tap."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, width=4).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.rand(32, 1, 8, 8), torch.arange(32) % 10
    for method in ("pgd-at", "sat", "sat-trades", "sat"):
        step = build_step(resolve("quick", method=method, attack_steps=2), model, 10)
        for _ in range(2):
            _, terms, _ = step(model, opt, x, y, 1)
        if method.startswith("sat"):
            assert terms["cluster"] > 0


@cuda
@pytest.mark.gpu
def test_a_recorded_step_reads_the_current_learning_rate():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, width=8).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    device_learning_rate(opt, device)
    graphed = GraphedStep(build_step(resolve("quick"), model, 10, amp=True), model, opt, capture=True, warmup=1)
    x, y = torch.rand(64, 1, 8, 8, device=device), torch.arange(64, device=device) % 10
    graphed(x, y, 1)                                     # eager warm-up: creates the momentum buffers
    for group in opt.param_groups:
        group["lr"].fill_(0.0)
    for state in opt.state.values():
        state["momentum_buffer"].zero_()
    before = copy.deepcopy(model.state_dict())
    graphed(x, y, 1)                                     # recorded, then replayed with lr = 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if v.is_floating_point()
               and "running" not in k), "the graph's update ignored a learning rate of 0"
    for group in opt.param_groups:
        group["lr"].fill_(0.1)
    graphed(x, y, 1)
    assert not torch.equal(before["linear.weight"], model.state_dict()["linear.weight"])


@cuda
@pytest.mark.gpu
def test_graphed_training_is_as_good_as_eager_on_cuda(tmp_path):
    accuracy = {}
    for graphs in ("on", "off"):
        cfg = resolve("quick", epochs=8, cuda_graphs=graphs, device="cuda")
        last = train(cfg, store=RunStore(tmp_path / graphs), progress=False).metrics().iloc[-1]
        accuracy[graphs] = (last["val_clean_acc"], last["val_pgd_acc"])
    (clean_g, pgd_g), (clean_e, pgd_e) = accuracy["on"], accuracy["off"]
    assert abs(clean_g - clean_e) <= 0.05 and abs(pgd_g - pgd_e) <= 0.08, accuracy


@cuda
@pytest.mark.gpu
def test_fp32_evaluation_agrees_between_cpu_and_cuda(trained_digits_model, digits_test):
    on_gpu = copy.deepcopy(trained_digits_model).cuda().to(memory_format=torch.channels_last)
    assert torch.equal(correct_mask(trained_digits_model, digits_test), correct_mask(on_gpu, digits_test))
    for attack in (BIM(0.1, steps=20), PGD(0.1, steps=20)):
        torch.manual_seed(0)
        cpu = correct_mask(trained_digits_model, digits_test, attack).float().mean().item()
        torch.manual_seed(0)
        gpu = correct_mask(on_gpu, digits_test, attack).float().mean().item()
        assert abs(cpu - gpu) <= (0.01 if isinstance(attack, BIM) else 0.02), (attack, cpu, gpu)   # PGD: other random starts
