"""Watching a run: the per-epoch training curves as ``curves.csv``, TensorBoard event files (``tensorboard/``)
and, at the end of training, ``curves.png``, all in the run directory and from rank 0 only.

The curves are the run's history (``Checkpoint.history``, metrics.json's ``history``), one entry per epoch,
flattened by :func:`flatten` into named numbers: ``epoch, train_loss, val_loss, val_auc, lr,
train_images_per_s, data_wait_fraction`` and whatever else an entry holds (``val_select``); a per-member value
(an ensemble's ``train_loss``, ``val_auc_members``) becomes one column per member, ``train_loss/<member>``,
``val_auc/<member>``. The CSV's columns and the TensorBoard tags are the same names, at step = epoch.

The CSV is rewritten whole from the history after every epoch (atomically), so a ``--resume`` never
duplicates an epoch. A resumed run's TensorBoard writer starts with a purge at step 1 (TensorBoard then hides
what the earlier event files logged) and logs the checkpoint's history again: TensorBoard shows exactly the
history the run holds, even when the run stopped between its checkpoint and its event file.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading

CSV = "curves.csv"
TENSORBOARD = "tensorboard"
PNG = "curves.png"
#: the columns that come first, in this order (the rest follow in the order the history names them)
FIRST = ("epoch", "train_loss", "val_loss", "val_auc", "lr", "train_images_per_s", "data_wait_fraction")
#: per-member values and the column stem each gets
_PER_MEMBER = {"train_loss": "train_loss", "val_auc_members": "val_auc"}


def learning_rate(members) -> float:
    """The learning rate the first member ends its epoch with (the largest of its parameter groups': the base
    rate, when groups are scaled down from it)."""
    return float(max(g["lr"] for g in members[0].optimizer.param_groups))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def flatten(entry: dict) -> dict[str, float]:
    """One history entry as ``{column: number}``: a one-member dict becomes its stem (``train_loss``), a
    several-member dict one column per member (``train_loss/<member>``); None and non-numbers are left out."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            stem = _PER_MEMBER.get(key, key)
            nums = {k: v for k, v in value.items() if _number(v)}
            if len(nums) == 1 and key == "train_loss":
                out[stem] = float(next(iter(nums.values())))
            else:
                out.update({f"{stem}/{k}": float(v) for k, v in nums.items()})
        elif _number(value):
            out[key] = float(value) if key != "epoch" else int(value)
    return out


def columns(history: list[dict]) -> list[str]:
    """The CSV's columns for ``history``: :data:`FIRST` (those present), then the rest as they come."""
    seen: list[str] = []
    for entry in history:
        for k in flatten(entry):
            if k not in seen:
                seen.append(k)
    first = [c for c in FIRST if c in seen]
    return first + [c for c in seen if c not in first]


def write_csv(path: str, history: list[dict]) -> None:
    """``history`` as a CSV, one row per epoch (a value an epoch lacks is an empty cell), written atomically."""
    from ..data.io import atomic_write_csv

    cols = columns(history)
    rows = [[f.get(c, "") for c in cols] for f in (flatten(h) for h in history)]
    atomic_write_csv(path, cols, rows)


def plot_curves(history: list[dict], path: str, title: str = "") -> str:
    """``curves.png``: losses, validation AUC, learning rate and throughput (with the data wait) per epoch."""
    from matplotlib.ticker import MaxNLocator

    from ..metrics import _atomic_savefig, _new_figure

    flat = [flatten(h) for h in history]
    cols = columns(history)
    fig = _new_figure(figsize=(9.0, 6.5))
    panels = [("loss", lambda c: c.startswith(("train_loss", "val_loss"))),
              ("validation AUC", lambda c: c.startswith("val_auc")),
              ("learning rate", lambda c: c == "lr"),
              ("images/s", lambda c: c == "train_images_per_s")]
    for k, (name, wanted) in enumerate(panels):
        ax = fig.add_subplot(2, 2, k + 1)
        drawn = False
        for c in (c for c in cols if wanted(c)):
            pts = [(f["epoch"], f[c]) for f in flat if c in f and "epoch" in f and math.isfinite(f[c])]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, lw=1.2, label=c)
                drawn = True
        if name == "images/s" and any("data_wait_fraction" in f for f in flat):
            twin = ax.twinx()
            pts = [(f["epoch"], 100 * f["data_wait_fraction"]) for f in flat if "data_wait_fraction" in f]
            twin.plot(*zip(*pts), "s--", ms=3, lw=1, color="C3", label="data wait %")
            twin.set_ylabel("data wait (%)", color="C3")
        if not drawn:
            ax.text(0.5, 0.5, "not measured" if name != "validation AUC" else "no validation split",
                    ha="center", va="center", transform=ax.transAxes, color="grey")
        elif name != "images/s" and name != "learning rate":
            ax.legend(fontsize=7)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _atomic_savefig(fig, path)


def _quiet_writer_threads() -> None:
    """TensorBoard writes event files from a thread of its own; a failed write there (a full disk) is kept for
    the main thread, which raises it at the next flush (one ``error:`` line from the command), and is also
    re-raised in the thread, whose traceback would be printed. The threading hook skips that one thread class's
    OSErrors (every other thread's exceptions go to the hook that was there)."""
    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:  # another tensorboard: its thread is left as it is
        return
    previous = threading.excepthook
    if getattr(previous, "quiet_tensorboard_writer", False):
        return

    def hook(args) -> None:
        if isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook.quiet_tensorboard_writer = True
    threading.excepthook = hook


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` imports (it needs the ``tensorboard`` package)."""
    import importlib.util

    try:
        return importlib.util.find_spec("tensorboard") is not None
    except ImportError:
        return False


class Curves:
    """The curves of one run in ``out``: :meth:`epoch` after every epoch's checkpoint, :meth:`close` once
    training is done. Does nothing on ranks other than 0 (``enabled=False``). ``history``: what a resumed
    run's checkpoint already holds. The event file is opened at the first epoch's end, after its checkpoint:
    a run stopped before that leaves only what ``rundir`` counts as an unstarted run."""

    def __init__(self, out: str, tensorboard: bool = True, enabled: bool = True, history: list[dict] = (),
                 say=None):
        self.out, self.enabled, self.tensorboard = out, enabled, tensorboard
        if tensorboard and enabled and not tensorboard_available():
            # a declared dependency, but an environment assembled by hand (a GPU node's wheels) may lack it:
            # the run goes on with curves.csv and curves.png, and says so once
            self.tensorboard = False
            (say or print)("warning: the tensorboard package is not installed: no TensorBoard event files "
                           "(curves.csv and curves.png are still written; --no-tensorboard silences this)")
        self.resumed = bool(history)
        self.writer = None

    @contextlib.contextmanager
    def _writing(self):
        """A failed write of the event file names the folder (TensorBoard's own error names no file)."""
        try:
            yield
        except OSError as exc:
            if exc.filename is None and exc.errno is not None:
                raise OSError(exc.errno, exc.strerror, os.path.join(self.out, TENSORBOARD)) from None
            raise

    def _open(self, history: list[dict]) -> None:
        """The writer; a resumed run's starts with a purge at step 1 and logs the checkpoint's history again."""
        from torch.utils.tensorboard import SummaryWriter

        _quiet_writer_threads()
        self.writer = SummaryWriter(os.path.join(self.out, TENSORBOARD), purge_step=1 if self.resumed else None)
        for entry in history:
            self._scalars(entry)

    def _scalars(self, entry: dict) -> None:
        f = flatten(entry)
        step = int(f.get("epoch", 0))
        for tag, value in f.items():
            if tag != "epoch":
                self.writer.add_scalar(tag, value, global_step=step)

    def epoch(self, history: list[dict]) -> None:
        """The epoch just done (``history[-1]``): the CSV rewritten from ``history``, its scalars logged."""
        if not self.enabled or not history:
            return
        write_csv(os.path.join(self.out, CSV), history)
        if self.tensorboard:
            with self._writing():
                if self.writer is None:
                    self._open(history)
                else:
                    self._scalars(history[-1])
                self.writer.flush()

    def close(self, history: list[dict]) -> None:
        """Training is over: ``curves.png`` written (when there is a history), the event file closed."""
        if not self.enabled:
            return
        if history:
            write_csv(os.path.join(self.out, CSV), history)
            plot_curves(history, os.path.join(self.out, PNG), os.path.basename(self.out))
        if self.writer is not None:
            writer, self.writer = self.writer, None
            with self._writing():
                writer.close()
