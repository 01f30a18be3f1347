"""Tests for dali_lens.models: shapes, stems, weight loading and band adaptation (CPU, small inputs)."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch
from torch import nn

from dali_lens.models import ARCHS, SmallCNN, adapt_input_conv, build_model, load_weights

LIGHT = ("small_cnn", "resnet18", "resnet34", "vit_tiny")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def test_archs_tuple():
    assert isinstance(ARCHS, tuple)
    assert set(ARCHS) == {"small_cnn", "resnet18", "resnet34", "vit_tiny", "vit_b_16"}


@pytest.mark.parametrize("arch", LIGHT)
@pytest.mark.parametrize("bands", [1, 3, 5])
def test_output_is_one_logit_per_sample(arch, bands):
    size = 32
    model = build_model(arch, bands, img_size=size)
    y = _forward(model, torch.randn(3, bands, size, size))
    assert y.shape == (3,) and y.dtype == torch.float32 and torch.isfinite(y).all()
    # batch of one stays (1,), not a 0-d scalar
    assert _forward(model, torch.randn(1, bands, size, size)).shape == (1,)
    assert (model.arch, model.in_chans, model.img_size) == (arch, bands, size)


def test_vit_b_16_single_forward_224():
    model = build_model("vit_b_16", 3, img_size=224)
    assert model.patch_size == 16
    assert _forward(model, torch.randn(1, 3, 224, 224)).shape == (1,)


def test_small_cnn_any_size_and_backward():
    model = build_model("small_cnn", 4, dropout=0.3)
    for size in (32, 45, 101):
        assert _forward(model, torch.randn(2, 4, size, size)).shape == (2,)
    model.train()
    x = torch.randn(4, 4, 48, 48)
    loss = nn.functional.binary_cross_entropy_with_logits(model(x), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert isinstance(model, SmallCNN)


def test_resnet_small_input_stem_default_and_override():
    small = build_model("resnet18", 5, img_size=64)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity) and small.conv1.in_channels == 5
    big = build_model("resnet18", 5, img_size=128)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    assert isinstance(big.maxpool, nn.MaxPool2d)
    forced = build_model("resnet34", 2, img_size=64, small_input=False)
    assert forced.conv1.kernel_size == (7, 7)
    assert _forward(forced, torch.randn(2, 2, 64, 64)).shape == (2,)


def test_vit_tiny_patch_and_multi_class():
    assert build_model("vit_tiny", 3, img_size=64).patch_size == 8
    assert build_model("vit_tiny", 3, img_size=160).patch_size == 16
    m = build_model("vit_tiny", 3, num_classes=2, img_size=32)
    assert _forward(m, torch.randn(3, 3, 32, 32)).shape == (3, 2)
    assert _forward(build_model("small_cnn", 1, num_classes=3), torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="small_cnn, resnet18, resnet34, vit_tiny, vit_b_16"):
        build_model("resnet50", 3)
    with pytest.raises(ValueError, match="multiple of its patch size 16"):
        build_model("vit_b_16", 3, img_size=100)
    with pytest.raises(ValueError, match="multiple of its patch size 8"):
        build_model("vit_tiny", 3, img_size=60)
    with pytest.raises(ValueError, match="in_chans"):
        build_model("small_cnn", 0)
    missing = tmp_path / "nope" / "weights.pt"
    with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")):
        build_model("small_cnn", 3, weights=str(missing))


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module_prefix"])
def test_state_dict_round_trip(tmp_path, wrap):
    src = build_model("resnet18", 3, img_size=32)
    # train a step's worth of BN statistics so buffers differ from a fresh init
    src.train()
    src(torch.randn(4, 3, 32, 32))
    sd = src.state_dict()
    if wrap == "model":
        obj = {"model": sd, "epoch": 3}
    elif wrap == "state_dict":
        obj = {"state_dict": sd}
    elif wrap == "module_prefix":
        obj = {f"module.{k}": v for k, v in sd.items()}
    else:
        obj = sd
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact match loads silently
        dst = build_model("resnet18", 3, img_size=32, weights=str(path))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_forward(dst, x), _forward(src, x))


def test_weights_file_with_non_tensor_objects_is_refused_unrun(tmp_path):
    src = build_model("small_cnn", 2)
    path = tmp_path / "ckpt.pt"
    # an arbitrary pickled object next to the weights: weights_only=True refuses it, and nothing falls back to
    # full unpickling (which would build, and so could run, whatever the file names)
    torch.save({"model": src.state_dict(), "options": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError, match=f"{path}: refused: it holds a Python object \\(argparse.Namespace\\)"):
        build_model("small_cnn", 2, weights=path)


def test_adapt_input_conv_formula():
    w = torch.randn(8, 3, 3, 3)
    w5 = adapt_input_conv(w, 5)
    assert w5.shape == (8, 5, 3, 3)
    for c in range(5):
        torch.testing.assert_close(w5[:, c], w.sum(1) / 5)
    torch.testing.assert_close(adapt_input_conv(w, 1)[:, 0], w.sum(1))  # one band: sum of RGB
    torch.testing.assert_close(adapt_input_conv(w, 3), w)


@pytest.mark.parametrize("arch,size", [("resnet18", 32), ("small_cnn", 32), ("vit_tiny", 32)])
@pytest.mark.parametrize("bands", [1, 5])
def test_rgb_weights_adapted_to_other_band_counts(tmp_path, arch, size, bands):
    rgb = build_model(arch, 3, img_size=size)
    path = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), path)
    with pytest.warns(UserWarning, match=f"3 -> {bands} bands"):
        multi = build_model(arch, bands, img_size=size, weights=path)
    stem = rgb.stem_key
    torch.testing.assert_close(multi.state_dict()[stem][:, 0], rgb.state_dict()[stem].sum(1) / bands)
    # every other tensor is copied unchanged
    for k, v in rgb.state_dict().items():
        if k != stem:
            torch.testing.assert_close(multi.state_dict()[k], v)
    # an image with identical bands gives the same logits as the RGB model on identical RGB channels
    grey = torch.randn(2, 1, size, size)
    torch.testing.assert_close(
        _forward(multi, grey.repeat(1, bands, 1, 1)), _forward(rgb, grey.repeat(1, 3, 1, 1)),
        rtol=1e-4, atol=1e-4,
    )


def test_imagenet_style_head_and_stem_mismatch_skipped_with_warning(tmp_path):
    # a 1000-class, 3-band, 7x7-stem ResNet-18 (like ImageNet weights) into a 5-band small-input lens finder
    imagenet = build_model("resnet18", 3, num_classes=1000, img_size=224)
    path = tmp_path / "imagenet.pt"
    torch.save(imagenet.state_dict(), path)
    with pytest.warns(UserWarning) as rec:
        model = build_model("resnet18", 5, img_size=64, weights=path)
    msg = " ".join(str(r.message) for r in rec)
    assert "fc.weight" in msg and "fc.bias" in msg and "conv1.weight" in msg and "small_input" in msg
    torch.testing.assert_close(model.layer3[0].conv1.weight, imagenet.layer3[0].conv1.weight)
    assert model.fc.weight.shape == (1, 512)
    # with the ImageNet stem kept, conv1 is adapted instead of skipped
    with pytest.warns(UserWarning, match="3 -> 5 bands"):
        report = load_weights(build_model("resnet18", 5, img_size=64, small_input=False), path)
    assert "conv1.weight" in report["loaded"]
    assert [s.split(" ")[0] for s in report["skipped"]] == ["fc.weight", "fc.bias"]


def test_vit_position_embedding_resized(tmp_path):
    src = build_model("vit_tiny", 3, img_size=64)  # 8x8 patches + class token = 65 tokens
    path = tmp_path / "vit.pt"
    torch.save(src.state_dict(), path)
    with pytest.warns(UserWarning, match="65 -> 17 tokens"):
        dst = build_model("vit_tiny", 3, img_size=32, weights=path)
    assert dst.encoder.pos_embedding.shape == (1, 17, 192)
    torch.testing.assert_close(dst.encoder.pos_embedding[:, 0], src.encoder.pos_embedding[:, 0])
    assert _forward(dst, torch.randn(1, 3, 32, 32)).shape == (1,)


def test_wrong_architecture_weights_rejected(tmp_path):
    path = tmp_path / "cnn.pt"
    torch.save(build_model("small_cnn", 3).state_dict(), path)
    with pytest.raises(ValueError, match="non-head tensors have a matching name"):
        build_model("resnet18", 3, weights=path)
    path2 = tmp_path / "tiny.pt"
    torch.save(build_model("vit_tiny", 3, img_size=32).state_dict(), path2)
    with pytest.raises(ValueError, match="shape mismatches"):
        build_model("vit_b_16", 3, img_size=32, weights=path2)
    path3 = tmp_path / "junk.pt"
    torch.save({"model": [1, 2, 3]}, path3)
    with pytest.raises(ValueError, match="state dict"):
        build_model("small_cnn", 3, weights=path3)
