"""Shared fixtures: the digits test split and a small trained model for attack tests (the private run
store of each session is set up in the root conftest.py)."""
from __future__ import annotations

import pytest
import torch

from satlib.data import load
from satlib.models import build_model


@pytest.fixture(scope="session")
def digits_test():
    return load("digits", "test")


@pytest.fixture(scope="session")
def trained_digits_model():
    """A narrow ResNet-18 trained normally on digits for a few epochs (about 97% clean accuracy)."""
    torch.manual_seed(0)
    train = load("digits", "train")
    model = build_model("resnet18", num_classes=10, in_channels=1, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        for idx in torch.randperm(len(train), generator=g).split(128):
            loss = torch.nn.functional.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
