"""Every journey README.md documents runs: each fenced shell command that runs a dali_lens command and each
```python block (issue 14: README and code must not drift apart).

Commands are found in the README as it is when the tests run, so new ones are covered without touching this
file. They run on small generated data and are scaled down only by appended options (``--epochs 1``, small
batches, one worker), never by editing their text:

* ``/data/NAME`` and ``/shared/NAME`` map into a temporary folder; an input that does not exist yet is
  generated there (the challenge layout when NAME mentions ``challenge``, else a small PNG set), outputs
  (``--out``, ``pack``'s OUT) are left to the command; ``~/.cache/dali-lens`` is ``$DALI_LENS_CACHE`` (a
  temporary folder); glob patterns (``runs/single-small_cnn-*/...``) expand as the shell would;
* ``--grades FILE`` (or ``train --labels FILE``) that no earlier command wrote (the grading page exports it) is made from the first
  predictions CSV under ``runs/``, grading its rows 0..3 in turn;
* ``--checkpoint P`` that no earlier command wrote gets a small trained run copied to P;
* a command without ``--out`` that writes a run gets ``--out runs/<trainer>-<arch>-readme-L<line>`` (the
  default name with the line for the time: two runs of the same trainer in one second would otherwise
  collide); the built-in default data set is a small one in a
  temporary ``$DALI_LENS_CACHE``;
* ``python -m dali_lens.X`` / ``.venv/bin/python -m dali_lens.X`` run in this process (``main(argv)``); a
  one-machine ``torchrun`` runs with 2 CPU processes; several-machine ``torchrun`` commands are skipped
  (they need other hosts; 2-process gloo runs are tested in test_train.py and test_predict.py).

A ```python block runs as written unless the line before it is ``<!-- readme-test: skip (reason) -->``.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import command_module

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(HERE, "README.md")
SHELLS = ("", "bash", "sh", "shell", "console")
# what each command gets appended so that it runs in seconds on tiny data
SMALL = {
    "train": ["--epochs", "1", "--batch-size", "8", "--workers", "1", "--no-progress"],
    "predict": ["--workers", "1", "--batch-size", "8", "--no-progress"],
    "evaluate": ["--workers", "1", "--batch-size", "8", "--no-progress"],
    "generate": ["--n", "40", "--size", "32"],
    "pack": ["--no-progress", "--no-fsync"],
}
WRITES_RUN = ("train",)


def fenced_blocks(text: str):
    """(language, first line number of the body, body, the line before the fence) for each fenced block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        yield m.group(1), i + 2, "\n".join(lines[i + 1:j]), lines[i - 1] if i else ""
        i = j + 1


def readme_commands(text: str):
    """(README line, command text, tokens) for every dali_lens command in a shell block."""
    out = []
    for lang, first, body, _ in fenced_blocks(text):
        if lang not in SHELLS:
            continue
        lines, start, buf = body.split("\n"), None, ""
        for k, line in enumerate(lines):
            if not buf and line.lstrip().startswith("#"):
                continue
            if start is None:
                start = first + k
            buf += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
            if line.rstrip().endswith("\\"):
                continue
            for part in re.split(r"&&|;|\|\|", buf):
                tokens = shlex.split(part.strip().removeprefix("$ "), comments=True)
                if any(t.startswith("dali_lens.") and i and tokens[i - 1] == "-m" for i, t in enumerate(tokens)):
                    out.append((start, part.strip(), tokens))
            start, buf = None, ""
    return out


def python_blocks(text: str):
    return [(first, body, before) for lang, first, body, before in fenced_blocks(text) if lang == "python"]


def test_readme_has_the_documented_journeys():
    text = open(README).read()
    modules = {t[t.index("-m") + 1] for _, _, t in readme_commands(text)}
    assert {"dali_lens.train", "dali_lens.predict", "dali_lens.evaluate", "dali_lens.check", "dali_lens.pack"} <= modules
    challenge = [c for _, c, _ in readme_commands(text) if "/data/challenge" in c and "dali_lens.train" in c]
    assert challenge, "the challenge command must be in README.md"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A working folder, the small data sets placeholders map to, a reference run, a small default set."""
    from dali_lens.data.synthetic import generate_dataset
    from dali_lens.trainers import TrainConfig, run
    from dali_lens.trainers.runner import DEFAULT_N, DEFAULT_SIZE

    base = tmp_path_factory.mktemp("readme")
    cache = base / "cache"
    default = cache / f"synthetic-v1-n{DEFAULT_N}-{DEFAULT_SIZE}px-seed0"
    generate_dataset(str(default), n=24, size=32, fmt="png", seed=0)
    lenses = str(base / "lenses")
    generate_dataset(lenses, n=24, size=32, fmt="png", seed=1)
    ref_run = str(base / "ref-run")
    run(TrainConfig(data_root=lenses, out=ref_run, epochs=1, batch_size=8, img_size=32, workers=1, progress=False),
        log=lambda *a: None)
    cwd = base / "cwd"
    cwd.mkdir()
    return {"base": str(base), "cache": str(cache), "lenses": lenses, "run": ref_run, "cwd": str(cwd)}


def _data_path(token: str, world: dict) -> str:
    name, sep, rest = token.partition("=")
    if sep and re.match(r"^[A-Za-z0-9_.-]+$", name) and rest.startswith(("/data/", "/shared/")):  # NAME=PATH
        return f"{name}={_data_path(rest, world)}"
    if token.startswith(("/data/", "/shared/")):
        return os.path.join(world["base"], token.lstrip("/"))
    if token == "~/.cache/dali-lens" or token.startswith("~/.cache/dali-lens/"):
        return world["cache"] + token[len("~/.cache/dali-lens"):]
    return token


def _expand(argv: list[str], cwd: str) -> list[str]:
    """Glob patterns expanded in ``cwd`` as the shell would (sorted; kept as written when nothing matches)."""
    out = []
    for t in argv:
        found = sorted(glob.glob(os.path.join(cwd, t))) if not t.startswith("-") and glob.has_magic(t) else []
        out.extend(os.path.relpath(f, cwd) for f in found) if found else out.append(t)
    return out


def _make_grades(path: str, cwd: str) -> None:
    """What the grading page exports (id,grade,score), for the first predictions CSV of a run under runs/."""
    import csv

    preds = sorted(glob.glob(os.path.join(cwd, "runs", "*", "predictions.csv")))
    assert preds, f"{path}: no predictions.csv under runs/ to grade"
    with open(preds[0], newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "grade", "score"])
        w.writerows([r["id"], k % 4, r["score"]] for k, r in enumerate(rows))


def _make_input(path: str, world: dict) -> None:
    """Generate the data a placeholder input path stands for (once)."""
    from dali_lens.data.synthetic import generate_dataset

    if os.path.exists(path):
        return
    if "challenge" in os.path.basename(path):
        generate_dataset(path, n=40, size=48, layout="challenge", seed=2)
    else:
        shutil.copytree(world["lenses"], path)


def prepare(line: int, tokens: list[str], world: dict) -> tuple[str, list[str], bool]:
    """(module, argv with placeholders mapped and small options appended, torchrun?) for one command."""
    m = tokens.index("-m")
    module = tokens[m + 1].split(".", 1)[1]
    launcher, argv = tokens[:m], _expand([_data_path(t, world) for t in tokens[m + 2:]], world["cwd"])
    outputs = {argv[i + 1] for i, t in enumerate(argv[:-1]) if t in ("--out", "-o")}
    positional = [t for i, t in enumerate(argv) if not t.startswith("-") and (i == 0 or not argv[i - 1].startswith("-"))]
    if module == "pack" and len(positional) >= 2:
        outputs.add(positional[1])
    for i, t in enumerate(argv):
        if t in outputs:
            continue
        named = t.partition("=")[2] if "=" in t and t.partition("=")[2].startswith(world["base"]) else t
        if named.startswith(world["base"]) and (i == 0 or argv[i - 1] not in ("--checkpoint", "-c")):
            _make_input(named, world)
        if i and argv[i - 1] in ("--checkpoint", "-c") and not os.path.exists(os.path.join(world["cwd"], t)):
            shutil.copytree(world["run"], os.path.join(world["cwd"], t))
        if i and argv[i - 1] in ("--grades", "--labels") and not os.path.exists(os.path.join(world["cwd"], t)):
            _make_grades(os.path.join(world["cwd"], t), world["cwd"])
    argv += SMALL.get(module, [])
    if module in WRITES_RUN and not outputs:
        def flag(name: str, default: str) -> str:
            return next((argv[i + 1] for i, t in enumerate(argv[:-1]) if t == name), default)

        trainer = flag("--trainer", "single")
        arch = "ensemble" if trainer == "ensemble" else flag("--arch", "small_cnn")
        argv += ["--out", f"runs/{trainer}-{arch}-readme-L{line}"]
    return module, argv, bool(launcher) and launcher[0] == "torchrun"


def _cases():
    return [pytest.param(line, cmd, tokens, id=f"L{line}-{tokens[tokens.index('-m') + 1]}")
            for line, cmd, tokens in readme_commands(open(README).read())]


@pytest.mark.parametrize("line,cmd,tokens", _cases())
def test_readme_command_runs(line, cmd, tokens, world, monkeypatch, capsys):
    """Run in README order (the parametrisation keeps it): later commands use what earlier ones wrote."""
    where = f"README.md line {line}: `{cmd}`"
    monkeypatch.chdir(world["cwd"])
    monkeypatch.setenv("DALI_LENS_CACHE", world["cache"])
    module, argv, torchrun = prepare(line, tokens, world)
    if torchrun:
        nnodes = next((int(tokens[i + 1]) for i, t in enumerate(tokens[:-1]) if t == "--nnodes"), 1)
        if nnodes > 1:
            pytest.skip(f"{where}: needs {nnodes} machines (2-process gloo runs: test_train.py, test_predict.py)")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
        cmdline = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", f"dali_lens.{module}", *argv]
        res = subprocess.run(cmdline, cwd=world["cwd"], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{where} failed ({res.returncode}):\n{res.stderr[-3000:]}"
        return
    try:
        # train and predict: dali_lens/<name>.py only runs dali_lens/commands/<name>.py under `python -m`
        rc = command_module(module).main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    out = capsys.readouterr()
    assert rc in (0, None), f"{where} exited {rc} (run as {module} {' '.join(argv)}):\n{out.err[-3000:]}"


def _python_cases():
    return [pytest.param(first, body, before, id=f"L{first}") for first, body, before in
            python_blocks(open(README).read())]


@pytest.mark.parametrize("first,body,before", _python_cases())
def test_readme_python_block_runs(first, body, before, tmp_path, monkeypatch, capsys):
    if "readme-test: skip" in before:
        reason = before.split("skip", 1)[1].strip(" ()->!")
        assert reason, f"README.md line {first}: a skipped python block needs a reason"
        compile(body, f"README.md:{first}", "exec")  # still valid Python
        pytest.skip(f"README.md line {first}: {reason}")
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile("\n" * (first - 1) + body, "README.md", "exec"), {"__name__": "__readme__"})
    except Exception as exc:
        raise AssertionError(f"README.md python block at line {first} failed: {type(exc).__name__}: {exc}") from exc
    out = capsys.readouterr().out
    if "demo-scores.csv" in body:  # the API example: its loop, training and predictions all happened
        assert "batches per epoch" in out and "test AUC" in out
        assert sum(1 for _ in open(tmp_path / "demo-scores.csv")) == 1 + 30  # header + every test cutout
