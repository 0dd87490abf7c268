"""The fast path keeps the numbers honest: a bf16 channels-last attack (as in training on a GPU) is as strong
as an fp32 one within noise, and reported accuracies are decided in fp32 whatever the model's layout."""
import copy

import torch

from satlib.attacks import PGD, CWInf
from satlib.config import resolve
from satlib.evaluation import correct_mask
from satlib.training import build_step


def fast_copy(model):
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def test_robust_accuracy_agrees_between_fp32_and_bf16_channels_last(trained_digits_model, digits_test):
    plain = trained_digits_model
    fast = fast_copy(plain)
    for attack_fp32, attack_bf16 in [(PGD(0.1, steps=20), PGD(0.1, steps=20, amp=True)),
                                     (CWInf(0.1, steps=20), CWInf(0.1, steps=20, amp=True))]:
        torch.manual_seed(0)
        acc_plain = correct_mask(plain, digits_test, attack_fp32).float().mean().item()
        torch.manual_seed(0)
        acc_fast = correct_mask(fast, digits_test, attack_bf16).float().mean().item()
        # 450 samples: one standard error of an accuracy near 0.5 is 0.024
        assert abs(acc_plain - acc_fast) <= 0.03, (type(attack_fp32).__name__, acc_plain, acc_fast)
    assert torch.equal(correct_mask(plain, digits_test), correct_mask(fast, digits_test)), \
        "the fp32 clean check depends on the memory layout"


def test_training_losses_agree_between_fp32_and_bf16(trained_digits_model, digits_test):
    """On the same adversarial batch the outer losses of PGD-AT, SAT and TRADES differ by < 2% in bf16.

    (The attack itself is compared statistically above: bf16 flips a few gradient signs, so single
    trajectories diverge while the accuracy they reach does not.)
    """
    x, y = digits_test.x[:128], digits_test.y[:128]
    torch.manual_seed(0)
    x_adv = PGD(0.1, steps=5)(trained_digits_model, x, y)
    for method in ("pgd-at", "sat", "trades"):
        cfg = resolve("quick", method=method, width=8)
        losses = []
        for fast in (False, True):
            model = fast_copy(trained_digits_model) if fast else copy.deepcopy(trained_digits_model)
            objective = build_step(cfg, model, 10).objective
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
                losses.append(objective(model.eval(), x, x_adv, y)[0].item())
        assert abs(losses[0] - losses[1]) <= 0.02 * abs(losses[0]), (method, losses)
