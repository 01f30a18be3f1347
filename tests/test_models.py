"""Tests for dali_lens.models: shapes, stems, timm models, weight loading and adaptation (CPU, small inputs).

The weight files are made with timm itself (``timm.create_model`` -> ``torch.save(model.state_dict())``, a
Lightning-style ``{'state_dict': {'model.' + k: v}}``, Zoobot's ``encoder.`` keys, ``safetensors``)."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch
from torch import nn

import timm
from timm.models import adapt_input_conv

from dali_lens.models import ARCHS, SmallCNN, block_groups, build_model, head_names, load_weights

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
    with pytest.raises(ValueError, match=r"unknown architecture 'efficientnet_b9x' \(--arch / --members\): not "
                                         r"small_cnn, vit_tiny, vit_b_16 or a timm model name; close timm names: "
                                         r"efficientnet_b\d"):
        build_model("efficientnet_b9x", 3)
    with pytest.raises(ValueError, match="multiple of its patch size 16"):
        build_model("vit_b_16", 3, img_size=100)
    with pytest.raises(ValueError, match="multiple of its patch size 8"):
        build_model("vit_tiny", 3, img_size=60)
    with pytest.raises(ValueError, match="in_chans"):
        build_model("small_cnn", 0)
    missing = tmp_path / "nope" / "weights.pt"
    with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")):
        build_model("small_cnn", 3, weights=str(missing))


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module_prefix", "compiled_prefix", "lightning"])
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
    elif wrap == "compiled_prefix":
        obj = {f"_orig_mod.module.{k}": v for k, v in sd.items()}
    elif wrap == "lightning":
        obj = {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3, "global_step": 10}
    else:
        obj = sd
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact match (under its prefix) loads silently
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


@pytest.mark.parametrize("arch,size", [("resnet18", 32), ("small_cnn", 32), ("vit_tiny", 32),
                                       ("mobilenetv3_small_050", 32)])
@pytest.mark.parametrize("bands", [1, 4, 6])
def test_rgb_weights_adapted_to_other_band_counts(tmp_path, arch, size, bands):
    rgb = build_model(arch, 3, img_size=size)
    path = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), path)
    with pytest.warns(UserWarning, match=f"3 -> {bands} bands"):
        multi = build_model(arch, bands, img_size=size, weights=path)
    stem = rgb.pretrained_cfg["first_conv"] + ".weight"
    # timm's adaptation (RGB repeated over the bands, scaled by 3 / bands; one band: the sum)
    torch.testing.assert_close(multi.state_dict()[stem], adapt_input_conv(bands, rgb.state_dict()[stem]))
    # every other tensor is copied unchanged
    for k, v in rgb.state_dict().items():
        if k != stem:
            torch.testing.assert_close(multi.state_dict()[k], v)
    x = torch.randn(2, bands, size, size)
    assert _forward(multi, x).shape == (2,)
    if bands in (1, 6):  # identical bands give the RGB model's logits on identical RGB channels
        grey = torch.randn(2, 1, size, size)
        torch.testing.assert_close(_forward(multi, grey.repeat(1, bands, 1, 1)), _forward(rgb, grey.repeat(1, 3, 1, 1)),
                                   rtol=1e-4, atol=1e-4)


def test_stem_of_another_band_count_than_rgb_kept_at_init(tmp_path):
    """timm adapts 3- (and 1-) band kernels only: a 4-band stem into 5 bands stays at its init, with a warning."""
    path = tmp_path / "four.pt"
    torch.save(build_model("small_cnn", 4).state_dict(), path)
    with pytest.warns(UserWarning, match=r"features.0.0.weight \(16, 4, 3, 3\) vs \(16, 5, 3, 3\): kept random init"):
        report = load_weights(build_model("small_cnn", 5), path)
    assert "features.0.0.weight" not in report["loaded"] and "features.1.0.weight" in report["loaded"]


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


# ---------------------------------------------------------------------------------------------------------
# timm models (issue 24): any name, any band count and input size, weights made with timm itself

TIMM_LIGHT = ("mobilenetv3_small_050", "resnet10t", "efficientnet_b0", "vit_tiny_patch16_224")


@pytest.mark.parametrize("arch", TIMM_LIGHT)
def test_timm_models_any_bands_and_size(arch):
    for bands, size in ((4, 32), (1, 48)):
        model = build_model(arch, bands, img_size=size)
        assert isinstance(model, timm.models.VisionTransformer if arch.startswith("vit") else nn.Module)
        y = _forward(model, torch.randn(3, bands, size, size))
        assert y.shape == (3,) and torch.isfinite(y).all()
        assert (model.arch, model.in_chans, model.img_size) == (arch, bands, size)
    assert _forward(build_model(arch, 2, num_classes=3, img_size=32), torch.randn(2, 2, 32, 32)).shape == (2, 3)


def test_timm_weights_load_exactly_from_every_format(tmp_path):
    """A timm state dict, the same as safetensors, and a Lightning checkpoint ({'state_dict': 'model.' + k}):
    the loaded lens finder computes exactly the source model's logits."""
    from safetensors.torch import save_file

    src = timm.create_model("mobilenetv3_small_050", pretrained=False, in_chans=3, num_classes=1)
    src.train()
    src(torch.randn(4, 3, 32, 32))  # BatchNorm statistics that differ from a fresh init
    src.eval()
    sd = src.state_dict()
    files = {"timm.pt": sd, "lightning.ckpt": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 2}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = src(x)[:, 0]
    for name in ("timm.pt", "lightning.ckpt", "w.safetensors"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = build_model("mobilenetv3_small_050", 3, img_size=32, weights=tmp_path / name)
        torch.testing.assert_close(_forward(model, x), want, rtol=0, atol=0)


def test_zoobot_encoder_found_under_its_prefix_and_1000_class_head_skipped(tmp_path):
    """Zoobot's FinetuneableZoobot/ZoobotTree keep a timm encoder (no head) under 'encoder.' next to their
    own head; an ImageNet-style 1000-class head is skipped with a warning. The features are the source's."""
    enc = timm.create_model("efficientnet_b0", pretrained=False, in_chans=3, num_classes=0)
    zoobot = {"state_dict": {**{f"encoder.{k}": v for k, v in enc.state_dict().items()},
                             "head.0.weight": torch.randn(4, 1280), "head.0.bias": torch.zeros(4)}}
    torch.save(zoobot, tmp_path / "zoobot.ckpt")
    with pytest.warns(UserWarning, match=r"found under 'encoder.' \(2 others ignored\).*missing from the file "
                                         r"\(left at init\): classifier.weight, classifier.bias"):
        model = build_model("efficientnet_b0", 3, img_size=32, weights=tmp_path / "zoobot.ckpt")
    x = torch.randn(2, 3, 32, 32)
    enc.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   enc(x), rtol=0, atol=0)
    imagenet = timm.create_model("efficientnet_b0", pretrained=False, num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "imagenet.pt")
    with pytest.warns(UserWarning, match=r"skipped \(shape mismatch, left at init\): classifier.weight "
                                         r"\(1000, 1280\) vs \(1, 1280\), classifier.bias"):
        report = load_weights(build_model("efficientnet_b0", 3, img_size=32), tmp_path / "imagenet.pt")
    assert len(report["loaded"]) == len(imagenet.state_dict()) - 2


@pytest.mark.parametrize("size", [64, 96])
def test_timm_vit_position_embeddings_resampled(tmp_path, size):
    """vit_tiny_patch16_224 weights (14x14 patches + class token) into img_size 64 / 96: timm's
    resample_abs_pos_embed; the class token's embedding and every other tensor are kept."""
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "vit.pt")
    grid = size // 16
    with pytest.warns(UserWarning, match=f"pos_embed \\(197 -> {grid * grid + 1} tokens\\), "
                                         "patch_embed.proj.weight \\(3 -> 4 bands\\)"):
        model = build_model("vit_tiny_patch16_224", 4, img_size=size, weights=tmp_path / "vit.pt")
    torch.testing.assert_close(model.patch_embed.proj.weight, adapt_input_conv(4, src.patch_embed.proj.weight))
    assert model.pos_embed.shape == (1, grid * grid + 1, 192)
    torch.testing.assert_close(model.pos_embed[:, 0], src.pos_embed[:, 0])
    torch.testing.assert_close(model.blocks[5].mlp.fc2.weight, src.blocks[5].mlp.fc2.weight)
    assert _forward(model, torch.randn(2, 4, size, size)).shape == (2,)


def test_nothing_is_downloaded(tmp_path, monkeypatch):
    """Building timm models and loading weights never opens a network connection."""
    import socket

    def refuse(*a, **k):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), tmp_path / "r.pt")
    with pytest.warns(UserWarning):
        model = build_model("resnet10t", 3, img_size=32, weights=tmp_path / "r.pt")
    assert _forward(model, torch.randn(1, 3, 32, 32)).shape == (1,)


def test_head_and_blocks():
    """The head is get_classifier()'s parameters; the blocks are timm's coarse group_matcher groups."""
    assert head_names(build_model("small_cnn", 3)) == {"fc.weight", "fc.bias"}
    assert [g[0] for g in block_groups(build_model("small_cnn", 3))] == [f"features.{i}.0.weight" for i in range(4)]
    resnet = build_model("resnet18", 3, img_size=32)
    assert head_names(resnet) == {"fc.weight", "fc.bias"}
    assert [g[0] for g in block_groups(resnet)] == ["conv1.weight"] + [f"layer{i}.0.conv1.weight" for i in range(1, 5)]
    vit = build_model("vit_tiny_patch16_224", 3, img_size=32)
    assert head_names(vit) == {"head.weight", "head.bias"} and len(block_groups(vit)) == 1 + 12


@pytest.mark.parametrize("small", [True, False])
def test_resnets_keep_torchvisions_state_dict(small):
    """resnet18/resnet34 are timm's now; runs made when they were torchvision ResNets (the same state-dict keys
    and the same computation) load strictly and give the same logits."""
    from torchvision.models.resnet import BasicBlock, ResNet

    old = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=1)
    old.conv1 = nn.Conv2d(4, 64, 3, 1, 1, bias=False) if small else nn.Conv2d(4, 64, 7, 2, 3, bias=False)
    if small:
        old.maxpool = nn.Identity()
    old.train()
    old(torch.randn(4, 4, 32, 32))
    new = build_model("resnet18", 4, img_size=32, small_input=small)
    new.load_state_dict(old.state_dict(), strict=True)
    x = torch.randn(3, 4, 32, 32)
    torch.testing.assert_close(_forward(new, x), _forward(old, x)[:, 0], rtol=0, atol=0)
