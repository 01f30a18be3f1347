"""``python -m dali_lens.predict``: streaming, resumable, multi-process scoring on generated cutouts.

Real data from the synthetic generator, the real DALI CPU backend (and torchvision), real checkpoints in
the trainers' format (``dali_lens.checkpoint.Checkpoint``), no mocks.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dali_lens.commands import predict as P
from dali_lens.predictions import find_parts, part_path
from dali_lens.data.synthetic import generate_dataset
from dali_lens.inference import CheckpointError, load_ensemble
from dali_lens.models import build_model
from dali_lens.checkpoint import Checkpoint, PixelSettings
from dali_lens.trainers.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 300
SIZE = 32


def make_checkpoint(path: str, members=(("small_cnn", 32, 0), ("small_cnn", 24, 1)), bands: int = 3,
                    mean=(0.2, 0.21, 0.23), std=(0.08, 0.12, 0.15), temperatures=None, kind: str = "image",
                    **config) -> str:
    """A checkpoint in the format the trainers write (``runner.save``), with seeded untrained weights."""
    states = []
    for k, (arch, scale, seed) in enumerate(members):
        torch.manual_seed(seed)
        model = build_model(arch, in_chans=bands, img_size=scale)
        with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 2.0)
        spec = {"arch": arch, "scales": (scale,), "seed": seed, "name": f"{arch}@{scale}#{seed}"}
        states.append({"spec": spec, "model": model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": None,
                       "temperature": (temperatures or [1.0] * len(members))[k], "history": []})
    tc = TrainConfig(trainer="ensemble" if len(members) > 1 else "single", **config)
    pixels = dataclasses.replace(PixelSettings.from_config(tc, kind), mean=mean, std=std)
    Checkpoint(members=states, bands=bands, pixels=pixels, config=tc.to_dict(), epoch=1, best_auc=0.5).save(path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = str(root / "data")
    generate_dataset(data, n=N, size=SIZE, seed=3)
    ckpt = make_checkpoint(str(root / "ens.pt"), temperatures=[0.8, 1.5])
    ref = str(root / "reference.csv")
    assert P.main(["--checkpoint", ckpt, data, "--out", ref, "--backend", "dali-cpu", "--no-progress",
                   "--batch-size", "32"]) == 0
    return {"root": root, "data": data, "ckpt": ckpt, "ref": ref}


def read(path: str) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def by_file(rows: list[list[str]]) -> dict[str, np.ndarray]:
    return {r[0]: np.array([float(v) for v in r[3:]]) for r in rows}


def all_files(data: str) -> set[str]:
    out = set()
    for split in ("train", "val", "test"):
        with open(os.path.join(data, f"{split}.csv"), newline="") as fh:
            out.update(os.path.join(data, r["filepath"]) for r in csv.DictReader(fh))
    return out


def all_labels(data: str) -> dict[str, str]:
    out = {}
    for split in ("train", "val", "test"):
        with open(os.path.join(data, f"{split}.csv"), newline="") as fh:
            out.update((os.path.join(data, r["filepath"]), r["label"]) for r in csv.DictReader(fh))
    return out


def assert_same_scores(path: str, ref: str, tol: float = 1e-5) -> None:
    head, rows = read(path)
    ref_head, ref_rows = read(ref)
    assert head == ref_head
    files = [r[0] for r in rows]
    assert len(files) == len(set(files)), "duplicate rows"
    a, b = by_file(rows), by_file(ref_rows)
    assert set(a) == set(b)
    worst = max(float(np.abs(a[f] - b[f]).max()) for f in a)
    assert worst <= tol, worst


def test_reference_output(env):
    head, rows = read(env["ref"])
    names = ["small_cnn@32#0", "small_cnn@24#1"]
    assert head == ["file", "id", "label", "score"] + [f"score_{n}" for n in names] + ["member_std"]
    assert {r[0] for r in rows} == all_files(env["data"])
    assert len(rows) == N
    for r in rows:
        assert r[1] == os.path.basename(r[0]).rsplit(".", 1)[0]
    assert {r[0]: r[2] for r in rows} == all_labels(env["data"])  # labelled data: its labels are written
    v = np.array([[float(x) for x in r[3:]] for r in rows])
    assert np.all((v[:, :3] >= 0) & (v[:, :3] <= 1))
    # the default fusion is the checkpoint's ('mean_prob' for this config); score = mean of the members
    np.testing.assert_allclose(v[:, 0], v[:, 1:3].mean(1), atol=2e-7)
    np.testing.assert_allclose(v[:, 3], v[:, 1:3].std(1), atol=2e-7)
    assert v[:, 0].std() > 1e-4  # the scores are not all the same


def test_resume_after_interruption(env, tmp_path, capsys):
    out = str(tmp_path / "preds.csv")
    args = ["--checkpoint", env["ckpt"], env["data"], "--out", out, "--backend", "dali-cpu", "--no-progress",
            "--batch-size", "32"]
    assert P.main(args + ["--limit", "100"]) == 0
    head, rows = read(out)
    assert len(rows) == 100
    # simulate a kill in the middle of writing a row: cut the last line in half
    with open(out, "rb") as fh:
        content = fh.read()
    cut = len(content) - 25
    with open(out, "r+b") as fh:
        fh.truncate(cut)
    kept = content[: content.rfind(b"\n", 0, cut) + 1]  # the complete rows before the cut
    assert P.main(args) == 0
    err = capsys.readouterr().err
    assert "truncated last line" in err and "99 already scored" in err
    with open(out, "rb") as fh:
        final = fh.read()
    assert final.startswith(kept), "completed rows must never be rewritten"
    assert_same_scores(out, env["ref"])
    # a complete output is left untouched
    before = (os.stat(out).st_mtime_ns, final)
    assert P.main(args) == 0
    assert "is complete" in capsys.readouterr().err
    with open(out, "rb") as fh:
        assert (os.stat(out).st_mtime_ns, fh.read()) == before


def test_killed_process_resumes(env, tmp_path):
    """A real SIGKILL mid-run (not a clean stop): the restart completes the file without duplicates."""
    out = str(tmp_path / "killed.csv")
    cmd = [sys.executable, "-m", "dali_lens.predict", "--checkpoint", env["ckpt"], env["data"], "--out", out,
           "--backend", "dali-cpu", "--no-progress", "--batch-size", "16", "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(out) and os.path.getsize(out) > 2000:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    _, partial = read(out)
    assert 0 < len(partial) < N, "the process should have been killed mid-way"
    assert P.main(cmd[3:]) == 0
    assert_same_scores(out, env["ref"])


def test_two_processes_torchrun(env, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): each remaining cutout scored exactly once, parts merged into OUT."""
    out = str(tmp_path / "dist.csv")
    base = ["--checkpoint", env["ckpt"], env["data"], "--out", out, "--backend", "dali-cpu", "--no-progress",
            "--batch-size", "32"]
    assert P.main(base + ["--limit", "61"]) == 0  # an earlier, interrupted job
    with open(out, "rb") as fh:
        first = fh.read()
    envv = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dali_lens.predict"] + base
    res = subprocess.run(cmd, cwd=REPO, env=envv, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stderr and "239 to score now" in res.stderr
    assert not find_parts(out), "part files must be merged and removed"
    with open(out, "rb") as fh:
        assert fh.read().startswith(first)
    assert_same_scores(out, env["ref"])


def test_merge_only(env, tmp_path, capsys):
    head, rows = read(env["ref"])
    out = str(tmp_path / "merged.csv")

    def write(path, part_rows, tail=""):
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(head)
            w.writerows(part_rows)
            fh.write(tail)

    write(out, rows[:50])
    write(part_path(out, 0, 2), rows[40:170], tail="/trunc")     # overlaps OUT; a truncated last line
    write(part_path(out, 1, 2), rows[170:])
    assert P.main(["--merge", "--out", out]) == 0
    assert "merged 2 part file(s)" in capsys.readouterr().err
    assert not find_parts(out)
    h2, merged = read(out)
    assert h2 == head and merged == rows  # each row once, OUT's rows first, verbatim
    assert P.main(["--merge", "--out", out]) == 0  # nothing left to merge: untouched
    assert read(out)[1] == rows


def test_inputs_list_folder_manifest(env, tmp_path):
    """Loose files in a folder, a .txt list, single files and an unlabelled CSV manifest."""
    _, ref_rows = read(env["ref"])
    ref = by_file(ref_rows)
    src = sorted(ref)[:12]
    folder = tmp_path / "loose"
    folder.mkdir()
    for f in src[:6]:
        shutil.copy(f, folder / os.path.basename(f))
    listing = tmp_path / "files.txt"
    listing.write_text("# cutouts\n" + "\n".join(src[6:9]) + "\n")
    manifest = tmp_path / "survey.csv"
    manifest.write_text("filepath,ra\n" + "".join(f"{f},{k}.5\n" for k, f in enumerate(src[9:11])))
    out = str(tmp_path / "mixed.csv")
    argv = ["-c", env["ckpt"], str(folder), str(listing), str(manifest), src[11], "--out", out,
            "--backend", "torchvision", "--no-progress"]
    assert P.main(argv) == 0
    _, rows = read(out)
    assert len(rows) == 12 and all(r[2] == "" for r in rows)  # unlabelled inputs: an empty label
    got = by_file(rows)
    for f, v in got.items():
        original = next(s for s in src if os.path.basename(s) == os.path.basename(f))
        # torchvision vs DALI CPU: same decode and no resize at 32 px; the 24 px member sees a resampled image
        assert abs(v[1] - ref[original][1]) < 1e-5
        assert abs(v[0] - ref[original][0]) < 2e-3


def test_fits_files_and_list(tmp_path):
    """FITS cutouts given one by one (DALI CPU) and as a .txt list (torchvision) score the same."""
    data = str(tmp_path / "fits")
    generate_dataset(data, n=24, size=SIZE, fmt="fits", seed=5)
    ckpt = make_checkpoint(str(tmp_path / "fits.pt"), members=(("small_cnn", 32, 0),), mean=(0.5,) * 3,
                           std=(1.0,) * 3, kind="fits", scaling="asinh", scale_a=0.05)
    files = sorted(all_files(data))
    a, b = str(tmp_path / "a.csv"), str(tmp_path / "b.csv")
    assert P.main(["-c", ckpt, *files, "--out", a, "--backend", "dali-cpu", "--no-progress", "--batch-size", "5"]) == 0
    (tmp_path / "list.txt").write_text("\n".join(files) + "\n")
    assert P.main(["-c", ckpt, str(tmp_path / "list.txt"), "--out", b, "--backend", "torchvision",
                   "--no-progress"]) == 0
    assert [r[0] for r in read(a)[1]] == files
    assert_same_scores(a, b, tol=1e-4)


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_bad_inputs(env, tmp_path, capsys):
    out = str(tmp_path / "x.csv")
    missing = str(tmp_path / "nope")
    assert P.main(["-c", env["ckpt"], missing, "--out", out]) == 2
    assert _err(capsys).startswith(f"error: {missing}")
    assert P.main(["-c", missing + ".pt", env["data"], "--out", out]) == 2
    assert missing + ".pt" in _err(capsys)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    assert P.main(["-c", str(corrupt), env["data"], "--out", out]) == 2
    assert str(corrupt) in _err(capsys)
    rundir = tmp_path / "run"
    rundir.mkdir()
    assert P.main(["-c", str(rundir), env["data"], "--out", out]) == 2
    assert "best.pt" in _err(capsys)
    one_band = make_checkpoint(str(tmp_path / "gray.pt"), members=(("small_cnn", 32, 0),), bands=1, mean=(0.2,),
                               std=(0.1,))
    assert P.main(["-c", one_band, env["data"], "--out", out]) == 2
    assert "band" in _err(capsys)
    assert not os.path.exists(out)
    # an output written by other checkpoints (other columns) is not appended to
    with open(out, "w") as fh:
        fh.write("file,id,score\n/a.png,a,0.5\n")
    assert P.main(["-c", env["ckpt"], env["data"], "--out", out, "--no-progress"]) == 2
    assert out in _err(capsys)
    with pytest.raises(SystemExit) as exc:
        P.main(["-c", env["ckpt"], "--out", out])  # no DATA: argparse usage error
    assert exc.value.code == 2


def test_ensemble_of_checkpoints_must_agree(env, tmp_path):
    other = make_checkpoint(str(tmp_path / "asinh.pt"), members=(("small_cnn", 32, 5),), scaling="asinh")
    with pytest.raises(CheckpointError, match="scaling"):
        load_ensemble([env["ckpt"], other], "cpu")
    ens = load_ensemble([env["ckpt"], make_checkpoint(str(tmp_path / "b.pt"), members=(("small_cnn", 32, 0),))],
                        "cpu")
    # the same member name in two checkpoints: made unique with the run directory
    assert len(set(ens.names)) == 3 and ens.scales == (24, 32)


def test_help_reads_like_documentation(capsys):
    with pytest.raises(SystemExit) as exc:
        P.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for words in ("Examples:", "torchrun", "--merge", "resume", "--limit", "--tta", "--fusion"):
        assert words in text


@pytest.mark.slow
def test_20k_cutouts(tmp_path):
    """20,000 generated 64 px PNG cutouts through the DALI CPU backend: every one once, bounded memory."""
    data = str(tmp_path / "data20k")
    generate_dataset(data, n=20000, size=64, seed=1)
    ckpt = make_checkpoint(str(tmp_path / "m.pt"), members=(("small_cnn", 64, 0),))
    out = str(tmp_path / "p20k.csv")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dali_lens.predict", "-c", ckpt, data, "--out", out,
                          "--backend", "dali-cpu", "--no-progress"], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    _, rows = read(out)
    files = [r[0] for r in rows]
    assert len(files) == 20000 and set(files) == all_files(data)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\n20k cutouts: {20000 / wall:.0f} img/s end to end ({wall:.0f} s), peak RSS {peak_mib:.0f} MiB")
    assert peak_mib < 4096
