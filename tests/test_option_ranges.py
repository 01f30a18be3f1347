"""Every option of every command is held to its documented range before any work (issue 22, section 3).

The cases are generated from the commands' parsers: every option that takes a value must either declare its
range (a ``dali_lens.choices`` range type, which lists values just outside it) or be listed below as free text
(paths, names). A newly added option is therefore covered by itself, or fails ``test_every_option_declares``.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import fields

import pytest

from conftest import command_module

from dali_lens.trainers.config import TrainConfig

#: command -> (module, parser factory, the required arguments, with {tmp} for the test's folder)
COMMANDS = {
    "train": ("train", "parser", ["--data-root", "{tmp}/data", "--out", "{tmp}/out"]),
    "generate": ("generate", "build_parser", ["{tmp}/out"]),
    "predict": ("predict", "parser", ["-c", "{tmp}/ck.pt", "{tmp}/data", "--out", "{tmp}/p.csv"]),
    "evaluate": ("evaluate", "parser", ["-c", "{tmp}/ck.pt", "{tmp}/data", "--out", "{tmp}/ev"]),
    "check": ("check", "parser", ["{tmp}/data"]),
    "pack": ("pack", "parser", ["{tmp}/data", "{tmp}/out"]),
    "inspect": ("inspect", "parser", ["{tmp}/p.csv", "{tmp}/data"]),
}

#: options whose value is free text (a path, a name, a list parsed against the data); everything else that
#: takes a value must declare a range
FREE_TEXT = {
    "train": {"data_root", "out", "batch_transforms", "arch", "memory_budget", "members", "weights", "psf"},
    "generate": {"out", "bands"},
    "predict": {"data", "checkpoint", "out", "split"},
    "evaluate": {"data", "checkpoint", "out", "split", "completeness_columns"},
    "check": {"data"},
    "pack": {"data", "out"},
    "inspect": {"predictions", "data", "out", "ids", "grades", "bins", "similar"},
}


def _parser(command: str) -> argparse.ArgumentParser:
    module, factory, _ = COMMANDS[command]
    return getattr(command_module(module), factory)()


def _valued(ap: argparse.ArgumentParser):
    """The actions that take a value (not --help, flags, choices)."""
    for a in ap._actions:
        if a.nargs == 0 or isinstance(a, (argparse._HelpAction, argparse.BooleanOptionalAction)):
            continue
        if a.choices is not None:
            continue
        yield a


def _cases():
    for command in COMMANDS:
        for a in _valued(_parser(command)):
            if hasattr(a.type, "invalid_examples"):
                for value in a.type.invalid_examples():
                    yield pytest.param(command, a.option_strings[-1], value, id=f"{command}{a.option_strings[-1]}={value}")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_declares_its_range(command):
    undeclared = []
    for a in _valued(_parser(command)):
        declared = hasattr(a.type, "invalid_examples") and hasattr(a.type, "describe")
        if not declared and a.dest not in FREE_TEXT[command]:
            undeclared.append(a.option_strings[-1] if a.option_strings else a.dest)
        if declared:
            if a.default is not None and not isinstance(a.default, tuple):
                a.type.check(a.option_strings[-1], a.default if not isinstance(a.default, str)
                             else a.type(a.default))  # the default is inside its own range
    assert not undeclared, f"{command}: options without a documented range: {undeclared}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_the_ranges(command, capsys):
    module, _, _ = COMMANDS[command]
    with pytest.raises(SystemExit) as exc:
        command_module(module).main(["--help"])
    assert exc.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at spaces and hyphens
    for a in _valued(_parser(command)):
        if hasattr(a.type, "describe"):
            assert "".join(f"[{a.type.describe}]".split()) in text, f"{command} {a.option_strings}: range not in --help"


@pytest.mark.parametrize("command,flag,value", list(_cases()))
def test_a_value_outside_the_range_is_one_error_line(command, flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    module, _, base = COMMANDS[command]
    argv = [a.format(tmp=tmp_path) for a in base] + [f"{flag}={value}"]
    with pytest.raises(SystemExit) as exc:
        command_module(module).main(argv)
    assert exc.value.code == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}"), out.err
    assert "Traceback" not in out.err and out.out == ""
    assert os.listdir(tmp_path) == []  # nothing written, nothing read


def test_train_library_door_has_the_same_ranges():
    """``dali_lens.train(...)`` builds a TrainConfig: the CLI's ranges hold there too."""
    ap = _parser("train")
    for a in _valued(ap):
        if not hasattr(a.type, "invalid_examples"):
            continue
        for value in a.type.invalid_examples():
            try:
                bad = a.type.kind(value) if hasattr(a.type, "kind") else value
            except ValueError:
                bad = value
            with pytest.raises(ValueError, match=a.option_strings[-1]):
                TrainConfig(**{a.dest: bad})
    TrainConfig()  # the defaults are valid
    assert {f.name for f in fields(TrainConfig)} >= {a.dest for a in _valued(ap)}


def test_train_refuses_zero_epochs_and_repeated_scales_before_any_work(tmp_path, capsys):
    from dali_lens.commands import train

    for argv, flag in ((["--epochs", "0"], "--epochs"), (["--scales", "64,64", "--trainer", "multiscale"], "--scales"),
                       (["--img-size", "7"], "--img-size"), (["--hdus", "-1"], "--hdus")):
        with pytest.raises(SystemExit) as exc:
            train.main(argv + ["--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "r")])
        assert exc.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: {flag}")
    assert os.listdir(tmp_path) == []


def test_predict_library_door_checks_the_options(tmp_path):
    import dali_lens

    for kw, flag in (({"batch_size": 0}, "--batch-size"), ({"threads": -3}, "--threads"),
                     ({"hdus": "-1"}, "--hdus"), ({"limit": 0}, "--limit")):
        with pytest.raises(ValueError, match=flag):
            dali_lens.predict(str(tmp_path / "ck.pt"), str(tmp_path / "data"), str(tmp_path / "p.csv"), **kw)
    assert os.listdir(tmp_path) == []
