import pytest
import torch

from satlib.models import FeatureTap, build_model, conv_layers, last_stage_blocks, residual_blocks


def test_resnet18_shapes_match_the_paper():
    model = build_model("resnet18", num_classes=10, in_channels=3, width=64)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.17e6, rel=0.01)
    with FeatureTap(model, ["layer4.1"]) as tap:
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and tap["layer4.1"].shape == (2, 512, 4, 4)   # 3x3 stem: 4x4 last stage


def test_narrow_grey_resnet_and_layer_names():
    model = build_model("resnet18", num_classes=10, in_channels=1, width=16)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    convs = conv_layers(model)
    assert len(convs) == 17 and convs[0] == "conv1" and convs[-1] == "layer4.1.conv2"
    assert len(conv_layers(model, include_shortcuts=True)) == 20
    assert residual_blocks(model) == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert last_stage_blocks(model) == ["layer4.0", "layer4.1"]


def test_wrn_28_10():
    model = build_model("wrn-28-10", num_classes=100, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(36.5e6, rel=0.01)
    assert len(residual_blocks(model)) == 12
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 100)


def test_feature_tap_is_the_forward_pass_and_cleans_up():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, width=4).eval()
    x = torch.rand(5, 1, 8, 8)
    with FeatureTap(model, ["conv1", "layer1.0"]) as tap:
        model(x)
    manual = torch.relu(model.bn1(model.conv1(x)))
    assert torch.equal(tap["conv1"], model.conv1(x))
    assert torch.allclose(tap["layer1.0"], model.layer1[0](manual))
    assert tap.flat("layer1.0").shape == (5, 4 * 8 * 8)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(KeyError, match="unknown layer"):
        FeatureTap(model, ["layer9"])


def test_feature_tap_reads_a_module_input():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, width=4).eval()
    x = torch.rand(5, 1, 8, 8)
    with FeatureTap(model, ["linear:input", "layer4.1"]) as tap:
        logits = model(x)
    assert torch.equal(model.linear(tap["linear:input"]), logits)
    assert torch.allclose(tap["linear:input"], tap["layer4.1"].mean((2, 3)))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with pytest.raises(KeyError, match="unknown layer"):
        FeatureTap(model, ["layer9:input"])


def test_features_carry_gradients():
    model = build_model("resnet18", num_classes=10, in_channels=1, width=4)
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    with FeatureTap(model, ["layer2.1"]) as tap:
        model(x)
    tap["layer2.1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", num_classes=10, in_channels=3)
