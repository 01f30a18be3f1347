"""The run directory of a training job: one run at a time, resumable, never mixed with other files.

* **One run at a time.** The run takes ``<out>/run.lock`` with an exclusive ``flock`` for its whole duration
  (``data/io.py``'s ``OutputLock``, shared with ``predict``) and writes who holds it (pid, host, start time,
  command) into it. A second run on the same ``--out`` fails at once, naming the first. The kernel drops the
  lock when the holder exits, however it exits (kill -9 included), so a lock file left behind never blocks a
  later run; a run that ends removes it. (``flock`` on NFS is only as reliable as the NFS server's locking; use
  a local or a cluster file system that supports it.)
* **A run that stopped before its first checkpoint** (killed during the first epoch, or stopped by bad data)
  leaves only its ``config.json``. Such a directory is reused: a plain rerun, or ``--resume`` (which has nothing
  to resume), starts from scratch in it and says so. Only a ``config.json`` that a run wrote counts (its record
  names the trainer, data root and resolved backend): a user's own ``config.json``, or any other file in the
  directory, makes a fresh run refuse, as before: nothing a user wrote is touched, and a refused run leaves the
  directory exactly as it was (no ``run.lock``). A run that fails before writing anything (its data missing or
  refused) leaves no folder where there was none (``OutputLock`` removes the folders it made while empty).
* **--resume with other options.** The options that decide what is trained (data, model, optimisation,
  loader) must equal the run's ``config.json``; otherwise the run stops and lists what differs.
  ``--allow-config-change`` continues with the new values and records the change in ``config.json``.
  Options that do not change what the checkpoint means may differ freely: :data:`SAFE_TO_CHANGE`
  (``--epochs`` extends or shortens the run; the learning-rate schedule is then stretched over the new
  total from the step reached).
* **--resume on other data.** ``config.json["data"]`` records what the run trained on (:func:`data_record`):
  for the train and val splits, the samples in order, each fingerprinted by its path relative to the data root,
  its label, and the size and modification time of its file(s): one ``stat`` per file, and an edited file
  changes its size or its mtime (so does a copy that does not keep mtimes, or ``touch``). A resume whose data
  differs stops with one line counting the files added, removed and edited (or reordered), unless
  ``--allow-config-change``, which records the change as for options. A run recorded before this check
  (no ``data``) resumes, saying that its data cannot be checked.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re

from ..data.io import OutputLock, OutputLockedError

LOCK = "run.lock"
CHECKPOINT = "last.pt"
#: what a run writes before its first checkpoint (besides its lock); a directory holding only these is reusable
BEFORE_CHECKPOINT = ("config.json",)
#: options that may differ on --resume without --allow-config-change
SAFE_TO_CHANGE = ("out", "resume", "allow_config_change", "epochs", "patience", "progress", "workers",
                  "checkpoint_every", "threshold", "tta", "backend", "memory_budget", "micro_batch",
                  "channels_last", "at_n", "prior", "tensorboard")
# an atomic write's temporary file (data/io.py) left by a killed run: .<name>.<pid>.<n>.tmp
_TMP = re.compile(r"^\..+\.\d+\.\d+\.tmp$")


class RunDirError(FileExistsError):
    """The run directory is in use by another run, or holds files that are not this run's."""


class ConfigChangedError(ValueError):
    """--resume with options that change what is being trained."""


class RunDir:
    """Context manager holding the run directory's lock (rank 0 only) from :meth:`claim` to the end of the run."""

    def __init__(self) -> None:
        self.lock: OutputLock | None = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def claim(self, out: str, resume: bool, is_main: bool, world: int, log=print) -> bool:
        """Lock ``out`` (rank 0) and decide whether this run resumes from its checkpoint: returns that.

        Raises :class:`RunDirError` (another run holds it; or it holds other files), ``FileNotFoundError``
        (``--resume`` without a checkpoint in a directory that holds other files). Under torchrun rank 0
        decides and the other ranks follow (or raise the same error). A refused run leaves ``out`` as it was
        (no lock file, and no folder where there was none).
        """
        decision: list = [None, None]
        if is_main:
            try:
                self._lock(out)
                decision[0] = _decide(out, resume, log)
            except (FileExistsError, FileNotFoundError) as exc:
                self.release()  # (and the folder the lock made, if it made one)
                decision[1] = exc
        if world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(decision, src=0)
        if decision[1] is not None:
            raise decision[1]
        return bool(decision[0])

    def _lock(self, out: str) -> None:
        def busy(holder: str) -> str:
            return (f"{out} is in use by another training run ({holder}); wait for it to finish or stop it, or "
                    "choose another --out")

        lock = OutputLock(os.path.join(out, LOCK), busy)
        try:
            lock.acquire()
        except OutputLockedError as exc:
            raise RunDirError(str(exc)) from None
        self.lock = lock


def _own_config(path: str) -> bool:
    """Whether ``path`` is a config.json that a training run wrote (its record: the resolved backend, the data
    root and the trainer), not a user's file of that name."""
    try:
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"trainer", "data_root", "backend_resolved"} <= set(saved)


def _decide(out: str, resume: bool, log) -> bool:
    files = sorted(f for f in os.listdir(out) if f != LOCK and not _TMP.match(f)) if os.path.isdir(out) else []
    if os.path.isfile(os.path.join(out, CHECKPOINT)):
        if resume:
            return True
        raise RunDirError(f"{out} already holds a run (its checkpoint {CHECKPOINT}); refusing to overwrite it. Use "
                          "--resume to continue that run, or choose another --out")
    others = [f for f in files if f not in BEFORE_CHECKPOINT or not _own_config(os.path.join(out, f))]
    if others:
        if resume:
            raise FileNotFoundError(f"--resume: no checkpoint {os.path.join(out, CHECKPOINT)} to resume from "
                                    f"({out} holds other files: {', '.join(others[:5])})")
        raise RunDirError(f"{out} already holds files ({', '.join(others[:5])}); refusing to overwrite them. "
                          "Choose another --out (or --resume to continue a run there)")
    if files:
        log(f"{out}: no checkpoint yet (an earlier run stopped before its first one); "
            + ("nothing to resume, so " if resume else "") + "starting from scratch in it")
    return False


#: the splits whose files decide what is trained (the test split only scores the result)
RECORDED_SPLITS = ("train", "val")
_KEY, _STATE = 6, 4  # bytes of a sample's fingerprint: a hash of its paths, a hash of its label, sizes, mtimes


def _stat(path: str) -> str:
    """``size:mtime_ns`` of a sample's file (a packed sample ``<shard>.tar#<member>``: its shard's)."""
    for p in (path, path.rsplit("#", 1)[0]):
        try:
            st = os.stat(p)
            return f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            continue
    return "missing"


def data_record(splits: dict, root: str) -> dict:
    """What a run trains on, for ``config.json["data"]``: per recorded split the sample count, a digest of the
    samples in order, and each sample's fingerprint (base64: a hash of its paths relative to ``root``, then a
    hash of its label and its files' sizes and mtimes)."""
    record: dict = {"fingerprint": "path relative to the data root, label, file size and mtime; in order"}
    stats: dict = {}  # a shard's stat, once for all its samples
    for name in RECORDED_SPLITS:
        if name not in splits:
            continue
        digest, packed = hashlib.sha256(), bytearray()
        for s in splits[name].samples:
            key = "\0".join(os.path.relpath(p, root) for p in s.files).encode("utf-8", "surrogateescape")
            state = (f"{s.label}\0" + "\0".join(stats.setdefault(p.rsplit("#", 1)[0] if "#" in p else p, _stat(p))
                                                 for p in s.files)).encode()
            digest.update(key + b"\1" + state + b"\n")
            packed += hashlib.blake2b(key, digest_size=_KEY).digest() + hashlib.blake2b(state, digest_size=_STATE).digest()
        record[name] = {"samples": len(splits[name].samples), "digest": digest.hexdigest(),
                        "files": base64.b64encode(bytes(packed)).decode("ascii")}
    return record


def _entries(split: dict) -> list[tuple[bytes, bytes]]:
    raw = base64.b64decode(split.get("files", ""))
    step = _KEY + _STATE
    return [(raw[i:i + _KEY], raw[i + _KEY:i + step]) for i in range(0, len(raw) - step + 1, step)]


def data_changes(saved: dict, now: dict) -> str:
    """What differs between two :func:`data_record` records, in words ('' when nothing)."""
    parts = []
    for name in RECORDED_SPLITS:
        a, b = saved.get(name), now.get(name)
        if a is None and b is None or (a and b and a.get("digest") == b.get("digest")):
            continue
        if a is None or b is None:
            parts.append(f"{name}: {'no' if a is None else a['samples']} samples then, "
                         f"{'none' if b is None else b['samples']} now")
            continue
        old, new = dict(_entries(a)), dict(_entries(b))
        added, removed = len(new.keys() - old.keys()), len(old.keys() - new.keys())
        edited = sum(old[k] != new[k] for k in old.keys() & new.keys())
        counts = [f"{n} {what}" for n, what in ((added, "added"), (removed, "removed"),
                                                (edited, "edited or relabelled (size, mtime or label)")) if n]
        parts.append(f"{name}: {a['samples']} samples then, {b['samples']} now; "
                     + (", ".join(counts) if counts else "the same files in another order"))
    return "; ".join(parts)


def _label_digests(files) -> list[str]:
    """``config.json["label_files"]`` as comparable ``name (sha256 ...)`` texts (the content, not the path)."""
    return [f"{f.get('name')} (sha256 {str(f.get('sha256'))[:12]})" for f in files or [] if isinstance(f, dict)]


def _real_roots(value) -> list[str]:
    return [os.path.realpath(str(v)) for v in (value if isinstance(value, (list, tuple)) else [value])]


def check_resume_config(out: str, now: dict, allow: bool, log=print, data: dict | None = None) -> dict:
    """``--resume``: the options in ``now`` (``TrainConfig.to_dict()`` plus the resolved ``data_root``), and the
    training data as ``data`` (:func:`data_record`) describes it, against the run's ``config.json``. Raises
    :class:`ConfigChangedError` saying what differs (unless ``allow``); returns what to add to the new
    ``config.json`` (the record of allowed changes, and ``data``)."""
    from .config import TrainConfig, as_text

    path = os.path.join(out, "config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            saved_all = json.load(fh)
    except (OSError, ValueError):
        from ..checkpoint import Checkpoint

        saved_all = Checkpoint.load(os.path.join(out, CHECKPOINT)).config
    saved = {**TrainConfig.from_dict(saved_all).to_dict(), "data_root": saved_all.get("data_root"),
             "label_files": _label_digests(saved_all.get("label_files"))}  # a run before --labels: none
    diffs = {}
    for key, value in now.items():
        if key in SAFE_TO_CHANGE or key not in saved:
            continue
        old = saved[key]
        if key == "label_files":  # what each --labels file held: its name and sha256
            value = _label_digests(value)
        if key == "data_root" and old and value:
            same = _real_roots(old) == _real_roots(value)
        else:
            same = old == value
        if not same:
            diffs[key] = (old, value)
    changes = list(saved_all.get("config_changes", []))
    extra = {"data": data} if data is not None else {}
    moved = ""
    if data is not None and not isinstance(saved_all.get("data"), dict):
        log(f"{out}: the run holds no record of its training data (an older dali-lens started it): resuming "
            "without checking that the data is unchanged")
    elif data is not None:
        moved = data_changes(saved_all["data"], data)
    if not diffs and not moved:
        return {"config_changes": changes, **extra} if changes else extra
    listing = "; ".join(f"--{k.replace('_', '-')}: {as_text(a)!r} then, {as_text(b)!r} now"
                        for k, (a, b) in diffs.items())
    said = " and ".join(t for t in (f"options differ from the run in {out} ({listing})" if diffs else "",
                                    f"the training data changed since the run in {out} started ({moved})"
                                    if moved else "") if t)
    if not allow:
        raise ConfigChangedError(f"--resume: {said}. Give the run's options (see {path}) and data, or pass "
                                 "--allow-config-change to continue with the new ones")
    log(f"--allow-config-change: continuing {out}: {said}")
    change = {"at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "changed": {k: {"from": a, "to": b} for k, (a, b) in diffs.items()}}
    if moved:
        change["data"] = moved
    changes.append(change)
    return {"config_changes": changes, **extra}
