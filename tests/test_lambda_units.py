"""SAT's lambda in per-sample units (Chapter 5): Eq. 7 with lambda = lambda_code * sqrt(B) ascends exactly
like the released code's batch-Frobenius form with lambda_code, when every sample's shift has the same norm."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from satlib.attacks import CrossEntropy
from satlib.config import RELEASED_LAMBDA
from satlib.training.objectives import FeatureShiftObjective, per_sample_lambda

B, D, C = 16, 12, 5


class Toy(nn.Module):
    """Features ``feat`` = an orthogonal map of the input (it keeps norms), then a linear classifier."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Linear(D, D, bias=False)
        nn.init.orthogonal_(self.feat.weight)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(torch.relu(self.feat(x.flatten(1))) + self.feat(x.flatten(1)))


def _gradients(x, r, y, code_lambda):
    model = Toy()
    objective = FeatureShiftObjective(CrossEntropy(), ["feat"], per_sample_lambda(code_lambda, B), random=False)
    ctx = objective.prepare(model, x, y)
    x_adv = (x + r).requires_grad_(True)
    per_sample, = torch.autograd.grad(objective(model, x_adv, y, ctx).sum(), x_adv)

    x_adv = (x + r).requires_grad_(True)
    shift = model.feat(x_adv.flatten(1)) - model.feat(x.flatten(1))
    code = F.cross_entropy(model(x_adv), y) - code_lambda * torch.linalg.norm(shift)   # one Frobenius norm
    released, = torch.autograd.grad(code, x_adv)
    return per_sample, released


def test_per_sample_lambda_gives_the_released_ascent_direction_for_equal_shifts():
    torch.manual_seed(0)
    x, y = torch.randn(B, D, dtype=torch.float32), torch.randint(0, C, (B,))
    direction = torch.randn(B, D, dtype=torch.float32)
    r = 0.3 * direction / direction.norm(dim=1, keepdim=True)     # every sample's shift has norm 0.3
    per_sample, released = _gradients(x, r, y, 0.087)
    assert torch.allclose(per_sample, B * released, rtol=1e-4, atol=1e-6)
    assert torch.equal(per_sample.sign(), released.sign())


def test_the_forms_differ_when_the_shifts_differ():
    torch.manual_seed(0)
    x, y = torch.randn(B, D, dtype=torch.float32), torch.randint(0, C, (B,))
    r = torch.randn(B, D, dtype=torch.float32) * torch.linspace(0.05, 1.0, B, dtype=torch.float32)[:, None]
    per_sample, released = _gradients(x, r, y, 0.087)
    assert not torch.allclose(per_sample, B * released, rtol=1e-3)


def test_the_default_lambda_is_the_released_weight_at_batch_128():
    assert math.isclose(RELEASED_LAMBDA, per_sample_lambda(0.087, 128))
    assert 0.98 < RELEASED_LAMBDA < 0.99
