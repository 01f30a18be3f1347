"""Trainers as a registry (``dali_lens/trainers/base.py``): nothing outside the trainer modules compares trainer
names, and a fourth trainer registered in a test alone trains, resumes and is scored by predict."""
from __future__ import annotations

import argparse
import ast
import csv
import os

import pytest
import torch

from test_layout import PKG, modules

import dali_lens
from dali_lens.checkpoint import MemberSpec, MemberState
from dali_lens.data.synthetic import generate_dataset
from dali_lens.inference import load_ensemble
from dali_lens.trainers import (TRAINERS, Trainer, get_trainer, register_trainer, run, trainer_names,
                                unregister_trainer)
from dali_lens.trainers.config import TrainConfig, add_arguments
from dali_lens.trainers.members import load_member_state, make_member, member_state

#: the modules that may know a trainer by name: the trainers themselves and the registry
TRAINER_MODULES = {os.path.join("trainers", f) for f in ("base.py", "single.py", "multiscale.py", "ensemble.py")}
BUILT_IN = ("single", "multiscale", "ensemble")


# ============================================================================================ no trainer names outside

def _is_trainer_expr(node: ast.AST) -> bool:
    """Something that holds a trainer's name: ``trainer``, ``cfg.trainer``, ``ck.config["trainer"]``,
    ``ck.config.get("trainer", ...)``, ``args.trainer_name``."""
    if isinstance(node, ast.Name):
        return node.id == "trainer" or node.id.endswith("_trainer") or node.id == "trainer_name"
    if isinstance(node, ast.Attribute):
        return node.attr == "trainer" or node.attr.startswith("trainer_name")
    if isinstance(node, ast.Subscript):
        key = node.slice
        return isinstance(key, ast.Constant) and key.value == "trainer"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == "trainer"
    return False


def _names_in(node: ast.AST, names) -> list[str]:
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and i.value in names]


def trainer_comparisons(source: str, names=BUILT_IN) -> list[tuple[int, str]]:
    """(line, what) of every place that tells trainers apart by name: a comparison with a trainer expression or
    with a trainer's name (``cfg.trainer == "ensemble"``, ``ck.config["trainer"] != x``, ``"multiscale" in t``),
    ``match cfg.trainer``, a lookup by trainer (``table[cfg.trainer]``) and a table keyed by trainer names."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and not all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            operands = [node.left, *node.comparators]
            if any(_is_trainer_expr(o) for o in operands):
                found.append((node.lineno, "comparison of a trainer"))
            else:
                found += [(node.lineno, repr(k)) for o in operands for k in _names_in(o, names)]
        elif isinstance(node, ast.Match) and _is_trainer_expr(node.subject):
            found.append((node.lineno, "match on a trainer"))
        elif isinstance(node, ast.Subscript) and _is_trainer_expr(node.slice):
            found.append((node.lineno, "lookup by trainer"))
        elif isinstance(node, ast.Dict) and len(_names_in(ast.Tuple([k for k in node.keys if k]), names)) > 1:
            found.append((node.lineno, "table keyed by trainer names"))
    return sorted(found)


def test_no_trainer_name_comparisons_outside_the_trainer_modules():
    """Trainer-specific behaviour lives in the trainers' hooks: no other module asks which trainer runs."""
    names = set(BUILT_IN) | set(trainer_names())
    sources = {os.path.relpath(path, PKG): path for path in modules().values()}  # every module of the package
    found = [f"{rel}:{line}: {what}" for rel, path in sorted(sources.items()) if rel not in TRAINER_MODULES
             for line, what in trainer_comparisons(open(path, encoding="utf-8").read(), names)]
    assert not found, f"trainers told apart by name outside their modules (add a Trainer hook instead): {found}"


def test_the_comparison_finder_sees_planted_lines():
    # the first four are the lines this test found before the registry (runner.py, inference.py)
    planted = ("out = f\"{cfg.trainer}-{cfg.arch if cfg.trainer != 'ensemble' else 'ensemble'}\"\n"
               "if cfg.trainer == 'ensemble' and cfg.fusion == 'temperature':\n    pass\n"
               "if len(ck.members) > 1 or ck.config.get('trainer') == 'ensemble':\n    pass\n"
               "t = {'single': SINGLE, 'multiscale': MULTISCALE, 'ensemble': ENSEMBLE}[name]\n"
               "a = ck.config['trainer'] == x\n"
               "b = 'multiscale' in names\n"
               "c = TABLE[args.trainer]\n"
               "match cfg.trainer:\n    case _:\n        pass\n"
               "fine = get_trainer(cfg.trainer) and cfg.fusion == 'mean_prob' and {'ensemble': 1}\n"
               "fine2 = label == 'ensemble_like' and kind.trainer_count and trainer is None\n")
    assert trainer_comparisons(planted) == [(1, "comparison of a trainer"), (2, "comparison of a trainer"),
                                            (4, "comparison of a trainer"), (6, "table keyed by trainer names"),
                                            (7, "comparison of a trainer"), (8, "'multiscale'"),
                                            (9, "lookup by trainer"), (10, "match on a trainer")]


# ============================================================================================ the registry

def test_the_built_in_trainers_are_registered_and_are_choices(tmp_path):
    assert trainer_names()[:3] == BUILT_IN and all(isinstance(TRAINERS[n], Trainer) for n in BUILT_IN)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "{single,multiscale,ensemble" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--trainer", "nope"])
    with pytest.raises(ValueError, match="unknown trainer 'nope'"):
        get_trainer("nope")
    with pytest.raises(ValueError, match="unknown trainer 'nope': choose from single, multiscale, ensemble"):
        run(TrainConfig(trainer="nope", out=str(tmp_path / "run")))  # (a KeyError before the registry)
    assert not os.path.exists(tmp_path / "run")
    with pytest.raises(TypeError, match="needs a Trainer"):
        register_trainer("broken", object())


# ============================================================================================ a fourth trainer

class TwoSeeds(Trainer):
    """Two members of ``--arch`` at ``--img-size``, seeds ``--seed`` and ``--seed + 1``, with a small penalty on
    large logits (its own extra loss term)."""

    def __init__(self):
        self.calls = {"extra_loss": 0, "after_fit": 0}

    def member_specs(self, cfg):
        return [MemberSpec(cfg.arch, (cfg.img_size,), cfg.seed), MemberSpec(cfg.arch, (cfg.img_size,), cfg.seed + 1)]

    def extra_loss(self, cfg, scales):
        def penalty(logits, k, labels):
            self.calls["extra_loss"] += 1
            assert len(logits) == len(scales) == 1 and logits[k].requires_grad and len(labels) == len(logits[k])
            return 1e-3 * (logits[k] ** 2).mean()
        return penalty

    def after_fit(self, cfg, members, val_loader, device, say):
        self.calls["after_fit"] += 1
        assert [m.spec.seed for m in members] == [cfg.seed, cfg.seed + 1]
        return None

    def run_name(self, cfg):
        return f"pair-{cfg.arch}"


@pytest.fixture
def two_seeds():
    trainer = register_trainer("twoseeds", TwoSeeds())
    yield trainer
    unregister_trainer("twoseeds")


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_trainer_registered_in_a_test_alone_trains_resumes_and_is_scored(tmp_path, monkeypatch, two_seeds):
    root = str(tmp_path / "data")
    generate_dataset(root, n=24, size=32, fmt="png", seed=5)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "twoseeds" in parser.format_help() and parser.parse_args(["--trainer", "twoseeds"]).trainer == "twoseeds"

    monkeypatch.chdir(tmp_path)  # the default run directory: runs/<run_name>-<time>
    opts = dict(trainer="twoseeds", img_size=32, batch_size=8, workers=1, backend="torchvision",
                fusion="mean_logit", progress=False, gallery=False)
    first = dali_lens.train(root, epochs=1, **opts)
    (run_dir,) = os.listdir("runs")
    assert run_dir.startswith("pair-small_cnn-")
    out = os.path.join(str(tmp_path), "runs", run_dir)
    names = ["small_cnn@32#0", "small_cnn@32#1"]
    assert list(first["history"][0]["train_loss"]) == names
    assert two_seeds.calls["extra_loss"] > 0 and two_seeds.calls["after_fit"] == 1

    # --resume after fewer epochs: the second epoch continues from last.pt
    second = dali_lens.train(root, out=out, epochs=2, resume=True, **opts)
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0] == first["history"][0]
    assert two_seeds.calls["after_fit"] == 2

    # predict scores with what the checkpoint holds: its two members, fused as the run said (--fusion)
    ens = load_ensemble(out, device="cpu")
    assert ens.names == names and ens.fusion == "mean_logit"
    scores = dali_lens.predict(out, os.path.join(root, "test"), str(tmp_path / "scores.csv"))
    rows, trained = _rows(scores), {r["file"]: r for r in _rows(os.path.join(out, "predictions.csv"))}
    assert rows and {f"score_{n}" for n in names} <= set(rows[0])
    assert len(rows) == len(trained)
    for r in rows:
        for col in ["score"] + [f"score_{n}" for n in names]:
            assert float(r[col]) == pytest.approx(float(trained[r["file"]][col]), abs=2e-6)


# ============================================================================================ a member's state

def test_member_state_has_no_history_and_old_ones_still_load():
    """``Member.history`` was saved and restored but never appended to (the run's history is the checkpoint's):
    it is gone, and a member state that still carries one (checkpoints before #23) loads."""
    cfg = TrainConfig(epochs=1)
    spec = MemberSpec("small_cnn", (16,), 0)
    m = make_member(spec, 3, cfg, steps_per_epoch=2, device=torch.device("cpu"))
    state = member_state(m).to_dict()
    assert "history" not in state and not hasattr(m, "history")
    old = {**state, "history": [{"epoch": 1}], "temperature": 1.5}
    fresh = make_member(MemberSpec("small_cnn", (16,), 1), 3, cfg, steps_per_epoch=2, device=torch.device("cpu"))
    load_member_state(fresh, MemberState.from_dict(old))
    assert fresh.temperature == 1.5 and not hasattr(fresh, "history")
    for a, b in zip(fresh.core.state_dict().values(), m.core.state_dict().values()):
        assert torch.equal(a, b)
