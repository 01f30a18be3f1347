"""One rule (issue 22, section 4): no command prints a Python traceback for bad input, bad options, a full disk
or a read-only output. Each failure is one ``error:`` line naming the file or option, exit status 2; SIGTERM is
handled like Ctrl-C (a message, checkpoints kept) with status 143. Option ranges: tests/test_option_ranges.py.

The commands run in this process (fast: no interpreter start per case), so a traceback shows up as an exception
escaping ``main``. A full disk is a small tmpfs filled up, a read-only output a ``mount -o ro`` tmpfs (chmod
does not stop root); both need ``mount`` (the tests run as root here and in CI) and are skipped, with the
reason, where it is not permitted.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import command_module

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--backend", "torchvision", "--workers", "1", "--batch-size", "8", "--no-progress"]


def _run(module: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of ``python -m dali_lens.<module> argv``; an exception escaping main (what
    would be a traceback) fails the test."""
    try:
        rc = command_module(module).main(argv)
    except SystemExit as exc:
        rc = exc.code
    except BaseException as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{module} {' '.join(argv)}: {type(exc).__name__} escaped (a traceback): {exc}")
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err.strip().splitlines()


def _one_error(lines: list[str], *words: str) -> str:
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, lines
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny PNG and FITS sets, a 1-epoch run on the PNGs and its predictions, made once."""
    from dali_lens import generate
    from dali_lens.commands import train

    root = tmp_path_factory.mktemp("world")
    png, fits, run = str(root / "png"), str(root / "fits"), str(root / "run")
    assert generate.main([png, "--n", "24", "--size", "32", "--quiet"]) == 0
    assert generate.main([fits, "--n", "12", "--size", "32", "--format", "fits", "--quiet"]) == 0
    assert train.main(["--data-root", png, "--out", run, "--epochs", "1", "--no-gallery"] + QUICK) == 0
    bad = root / "latin1.csv"  # a manifest naming a file in Latin-1, not UTF-8
    bad.write_bytes(b"filepath,label\n" + os.path.join(png, "caf\xe9.png").encode("latin-1") + b",1\n")
    badlist = root / "latin1.txt"
    badlist.write_bytes(os.path.join(png, "caf\xe9.png").encode("latin-1") + b"\n")
    # a folder of files one of which is named with a byte that is not UTF-8 (Latin-1 'é'), and a packed set whose
    # sample list holds an id with a lone surrogate (JSON's "\udcff")
    import shutil

    pack = command_module("pack")

    byte_name = str(root / "byte_name")
    pngs = sorted(glob.glob(os.path.join(png, "**", "*.png"), recursive=True))[:6]
    os.makedirs(byte_name)
    for k, f in enumerate(pngs):
        shutil.copy(f, os.path.join(byte_name, f"c{k}.png"))
    os.rename(os.path.join(byte_name, "c0.png").encode(), os.path.join(byte_name, "").encode() + b"caf\xe9.png")
    packed = str(root / "packed")
    assert pack.main([png, packed, "--no-progress"]) == 0
    listed = sorted(glob.glob(os.path.join(packed, "*", "shard-*.json")))[0]
    with open(listed) as fh:
        text = fh.read()
    first = json.loads(text)["ids"][0]
    with open(listed, "w") as fh:
        fh.write(text.replace(json.dumps(first), json.dumps(first)[:-1] + '\\udcff"', 1))
    return {"root": str(root), "png": png, "fits": fits, "run": run, "preds": os.path.join(run, "predictions.csv"),
            "bad_csv": str(bad), "bad_list": str(badlist), "byte_name": byte_name, "packed": packed,
            "listed": listed}


# ----------------------------------------------------------------------------------------- bad input, options

def _bad_input_cases():
    # (command, argv with {w[...]} placeholders and {o} an output in a fresh folder, words the line must hold)
    return [
        ("check", ["{fits}", "--hdus", "99"], ["--hdus 99", ".fits"]),
        ("pack", ["{fits}", "{o}"  , "--hdus", "99", "--no-progress"], ["--hdus 99", ".fits"]),
        ("predict", ["-c", "{run}", "{fits}", "--out", "{o}.csv", "--hdus", "99"] + QUICK, ["--hdus 99", ".fits"]),
        ("evaluate", ["-c", "{run}", "{fits}", "--out", "{o}", "--hdus", "99"] + QUICK, ["--hdus 99", ".fits"]),
        ("train", ["--data-root", "{fits}", "--out", "{o}", "--hdus", "99", "--epochs", "1"] + QUICK,
         ["--hdus 99", ".fits"]),
        ("inspect", ["{preds}", "{fits}", "--out", "{o}", "--hdus", "99"], ["--hdus 99", ".fits"]),
        ("predict", ["-c", "{run}", "{bad_csv}", "--out", "{o}.csv"] + QUICK, ["latin1.csv", "line 2", "UTF-8"]),
        ("predict", ["-c", "{run}", "{bad_list}", "--out", "{o}.csv"] + QUICK, ["latin1.txt", "line 1", "UTF-8"]),
        ("evaluate", ["-c", "{run}", "{bad_csv}", "--out", "{o}"] + QUICK, ["latin1.csv", "UTF-8"]),
        ("inspect", ["{bad_csv}", "{png}", "--out", "{o}"], ["latin1.csv", "UTF-8"]),
        ("train", ["--data-root", "{png}", "--out", "{o}", "--epochs", "0"], ["--epochs"]),
        ("train", ["--data-root", "{png}", "--out", "{o}", "--trainer", "multiscale", "--scales", "64,64"],
         ["--scales"]),
        ("train", ["--data-root", "{png}", "--out", "{o}", "--img-size", "7"], ["--img-size"]),
        ("predict", ["-c", "{run}", "{png}", "--out", "{o}.csv", "--threads", "-3"], ["--threads"]),
        ("generate", ["{o}", "--n", "-4"], ["--n"]),
        # names that are not UTF-8 text: refused by name before any output (they were tracebacks: DALI's readers
        # and the CSV and Parquet writers take UTF-8 only)
        ("predict", ["-c", "{run}", "{byte_name}", "--out", "{o}.csv"] + QUICK, ["caf\\udce9.png", "UTF-8"]),
        ("predict", ["-c", "{run}", "{byte_name}", "--out", "{o}.parquet"] + QUICK, ["caf\\udce9.png", "UTF-8"]),
        ("pack", ["{byte_name}", "{o}", "--no-progress"], ["caf\\udce9.png", "UTF-8"]),
        ("predict", ["-c", "{run}", "{packed}", "--out", "{o}.parquet", "--backend", "dali-cpu", "--no-progress"],
         ["{listed}", "UTF-8"]),
        ("predict", ["-c", "{run}", "{packed}", "--out", "{o}.csv", "--no-progress"], ["{listed}", "UTF-8"]),
        ("train", ["--data-root", "{packed}", "--out", "{o}", "--epochs", "1"] + QUICK, ["{listed}", "UTF-8"]),
    ]


@pytest.mark.parametrize("command,argv,words", _bad_input_cases(),
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(_bad_input_cases())])
def test_bad_input_and_options_are_one_line(world, command, argv, words, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = [a.replace("{o}", out).format(**world) for a in argv]
    rc, lines = _run(command, argv, capsys)
    assert rc == 2
    _one_error(lines, *[w.format(**world) for w in words])
    assert not glob.glob(out + "*"), "an output was written"


# ----------------------------------------------------------------------------------------- full and read-only

@contextlib.contextmanager
def _tmpfs(path: str, options: str, fill: bool = False):
    os.makedirs(path, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}): needs root")
    try:
        if fill:  # a full disk: every byte taken by a filler file
            with contextlib.suppress(OSError), open(os.path.join(path, "filler"), "wb") as fh:
                while True:
                    fh.write(b"\0" * 4096)
                    fh.flush()
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def _writers(world, out):
    return {
        "train": ["--data-root", world["png"], "--out", f"{out}/run", "--epochs", "1", "--no-gallery"] + QUICK,
        "predict": ["-c", world["run"], world["png"], "--out", f"{out}/p.csv"] + QUICK,
        "evaluate": ["-c", world["run"], world["png"], "--out", f"{out}/ev", "--n-boot", "5", "--no-gallery"] + QUICK,
        "pack": [world["png"], f"{out}/pk", "--no-progress"],
        "inspect": [world["preds"], world["png"], "--out", f"{out}/insp", "--top", "4"],
        "generate": [f"{out}/gen", "--n", "8", "--size", "32", "--quiet"],
    }


# (mount options, fill it, the reason the line must give): full from the first byte, full part-way (the
# checkpoint, the CSV or the images do not fit in one 4 kB page: torch's zip writer fails mid-file), read-only
DISKS = {"full": ("size=256k", True, "no space left on device"),
         "small": ("size=4k", False, "no space left on device"),
         "read-only": ("ro,size=256k", False, "read-only file system")}


@pytest.mark.parametrize("disk", list(DISKS))
@pytest.mark.parametrize("command", ["train", "predict", "evaluate", "pack", "inspect", "generate"])
def test_a_full_or_read_only_output_is_one_line(world, command, disk, tmp_path, capsys):
    options, fill, reason = DISKS[disk]
    with _tmpfs(str(tmp_path / "mnt"), options, fill) as mnt:
        rc, lines = _run(command, _writers(world, mnt)[command], capsys)
        assert rc == 2, lines
        line = _one_error(lines, "cannot write", reason)
        assert mnt in line  # names the output
        # nothing a rerun would trust: no temporary files, no checkpoint or manifest that is not complete
        assert not glob.glob(os.path.join(mnt, "**", ".*.tmp"), recursive=True)
        for path in glob.glob(os.path.join(mnt, "**", "*.pt"), recursive=True):
            import torch

            torch.load(path, map_location="cpu", weights_only=False)  # a complete file (ours, just written)


# ----------------------------------------------------------------------------------------- SIGTERM

def test_sigterm_is_handled_like_ctrl_c(world, tmp_path):
    out = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "dali_lens.train", "--data-root", world["png"], "--out", out,
                             "--epochs", "200", "--checkpoint-every", "1", "--no-gallery"] + QUICK,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(out, "last.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert "terminated (SIGTERM)" in err and "--resume" in err
    assert os.path.exists(os.path.join(out, "last.pt"))  # the checkpoints are kept
