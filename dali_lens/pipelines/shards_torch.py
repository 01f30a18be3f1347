"""The torchvision fallback for packed shards: stream the WebDataset tars with the ``webdataset`` library.

Same interface and batches as :class:`~dali_lens.pipelines.torchvision_backend.TorchvisionLoader` (``len()``,
``set_epoch()``, ``state_dict()``/``load_state_dict()``, contract batches checked by ``BatchChecker``) and the
same per-sample steps (the member kind's ``decode_torch_bytes``, ``prescale``, ``transform``), so tensors match
the loose files and the DALI backends.

Reading is sequential: each worker streams the shards it needs (``webdataset.tariterators.tar_file_iterator``
over the tar, starting at the first member it needs, found from the shard's index) and keeps only its own
samples. Every epoch has a plan computed from (seed, epoch, rank) alone:

* eval: this rank's contiguous range of samples (``options.shard_bounds``, as ``epoch_order``), in dataset
  order; every sample exactly once across ranks; the last batch may be partial.
* train: the shards in a seeded random order, concatenated; rank r takes the r-th of ``num_shards`` equal
  parts of ``n // num_shards`` samples (disjoint ranks, equal batch counts, like ``epoch_order``); the part
  is shuffled within windows of ``opts.shuffle_buffer`` samples (default 1024) and cut into full
  batches.

Batch j of the plan is built by worker ``(j - skip) % W``: the DataLoader takes batches from its workers in
turn, so batches arrive in plan order and a resumed epoch (``load_state_dict``) simply starts at batch
``skip`` without decoding the batches before it. The epoch and the resume point reach the persistent workers
through a small shared-memory tensor.
"""
from __future__ import annotations

import tarfile

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..data.dataset import DataError, Dataset
from ..data.readers import check_array
from ..data.shards import BLOCK, shard_index, shard_plan, split_member_path
from .options import LoaderOptions, augment_params, prescale, shard_bounds
from .torchvision_backend import WorkerLoader, transform

try:
    from webdataset.tariterators import tar_file_iterator as _wds_tar_iterator
except ImportError:  # pragma: no cover - webdataset is a dependency; keep working without it
    _wds_tar_iterator = None


def epoch_plan(groups: list[tuple[str, np.ndarray]], n: int, epoch: int, opts: LoaderOptions
               ) -> tuple[list[tuple[str, np.ndarray]], list[np.ndarray]]:
    """(segments to stream in order: (tar, positions), batches of positions) for this rank and epoch."""
    b = opts.batch_size
    if not opts.train:
        lo, hi = shard_bounds(n, opts.shard_id, opts.num_shards)
        segments = []
        for tar, pos in groups:
            sel = pos[(pos >= lo) & (pos < hi)]
            if len(sel):
                segments.append((tar, sel))
        seq = np.arange(lo, hi, dtype=np.int64)
        return segments, [seq[k:k + b] for k in range(0, len(seq), b)]
    rng = np.random.default_rng([opts.seed, epoch, 0x5a4d])
    order = rng.permutation(len(groups))
    per = n // opts.num_shards
    lo, hi = opts.shard_id * per, (opts.shard_id + 1) * per
    segments, parts, start = [], [], 0
    for k in order:
        tar, pos = groups[k]
        a, z = max(lo, start), min(hi, start + len(pos))
        if a < z:
            segments.append((tar, pos[a - start:z - start]))
            parts.append(pos[a - start:z - start])
        start += len(pos)
    seq = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    window = max(1, int(opts.shuffle_buffer))
    mix = np.random.default_rng([opts.seed, epoch, opts.shard_id, 0xb0f])
    seq = np.concatenate([mix.permutation(seq[k:k + window]) for k in range(0, len(seq), window)]) if len(seq) else seq
    return segments, [seq[k:k + b] for k in range(0, (len(seq) // b) * b, b)]


def _tar_members(fileobj, wanted):
    """(name, bytes) of the wanted members, streaming from the file's current position (webdataset's reader)."""
    if _wds_tar_iterator is not None:
        for item in _wds_tar_iterator(fileobj, select_files=wanted.__contains__):
            yield item["fname"], item["data"]
        return
    with tarfile.open(fileobj=fileobj, mode="r|") as stream:  # pragma: no cover - without webdataset
        for ti in stream:
            if ti.isreg() and ti.name in wanted:
                yield ti.name, stream.extractfile(ti).read()


class _ShardStream(IterableDataset):
    """Yields ``({scale: (B, C, s, s)}, positions)`` batches of one worker's share of the epoch plan."""

    def __init__(self, dataset: Dataset, opts: LoaderOptions, state: torch.Tensor):
        self.dataset, self.opts, self.state = dataset, opts, state
        plan = shard_plan(dataset)
        self.groups = [(g.tar, g.positions) for g in plan.groups]
        self.member = plan.member  # the kind the pixels are stored as

    def _members(self, positions) -> dict[str, int]:
        return {split_member_path(self.dataset.samples[int(p)].path)[1]: int(p) for p in positions}

    def _stream(self, tar: str, positions):
        names = self._members(positions)
        index = shard_index(tar)
        try:
            start = min(index[m.partition(".")[0]][m.partition(".")[2]][0] for m in names) - BLOCK
        except KeyError:
            missing = next(m for m in names if m.partition(".")[2] not in index.get(m.partition(".")[0], {}))
            raise DataError(f"{tar}#{missing}: not in the shard's index") from None
        seen: set[str] = set()
        try:
            with open(tar, "rb") as fh:
                fh.seek(start)
                for name, data in _tar_members(fh, names):
                    if name in seen:
                        continue
                    seen.add(name)
                    yield names[name], data
                    if len(seen) == len(names):
                        return
        except (OSError, tarfile.TarError, ValueError) as exc:
            raise DataError(f"{tar}: cannot read the shard ({str(exc).splitlines()[0]})") from None
        missing = sorted(set(names) - seen)
        raise DataError(f"{tar}#{missing[0]}: missing from the archive ({len(missing)} indexed member(s) not "
                        "found); the shard is truncated or corrupt")

    def _decode(self, pos: int, data: bytes) -> np.ndarray:
        sample = self.dataset.samples[pos]
        allow = self.opts.mask_value is not None and not self.member.eight_bit
        arr = self.member.decode_torch_bytes(data, sample.path)
        check_array(arr, sample, self.dataset, allow_nonfinite=allow)
        return arr

    def _view(self, pos: int, arr: np.ndarray, epoch: int) -> dict[int, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(prescale(arr, self.member.name, self.opts)))
        params = (augment_params(self.opts.seed + 7919 * self.opts.shard_id, epoch, pos, self.opts.max_shift)
                  if self.opts.augment else (0, 0, 0, 0, 0))
        return transform(x, self.opts, params)

    def _batch(self, positions: np.ndarray, raw: dict[int, bytes], epoch: int):
        arrays = [self._decode(int(p), raw[int(p)]) for p in positions]
        flags = None
        if self.opts.inject is not None:  # issue 25: the batch's arcs in one call, on the native pixels
            from .injecting import paint_arrays

            arrays, flags = paint_arrays(self.opts.inject, arrays, [int(p) for p in positions], epoch,
                                         self.dataset.labels)
        views = [self._view(int(p), a, epoch) for p, a in zip(positions, arrays)]
        images = {s: torch.stack([v[s] for v in views]) for s in self.opts.scales}
        out = (images, torch.as_tensor(positions, dtype=torch.long))
        return out + (torch.tensor(flags, dtype=torch.bool),) if flags is not None else out

    def __iter__(self):
        info = get_worker_info()
        w, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, skip = int(self.state[0]), int(self.state[1])
        segments, batches = epoch_plan(self.groups, len(self.dataset), epoch, self.opts)
        mine = list(range(skip + w, len(batches), n_workers))
        if not mine:
            return
        batch_of = {int(p): j for j in mine for p in batches[j]}
        pending: dict[int, dict[int, bytes]] = {}
        k = 0
        for tar, positions in segments:
            want = [p for p in positions.tolist() if p in batch_of]
            if not want:
                continue
            for pos, data in self._stream(tar, want):
                pending.setdefault(batch_of[pos], {})[pos] = data
                while k < len(mine) and len(pending.get(mine[k], ())) == len(batches[mine[k]]):
                    yield self._batch(batches[mine[k]], pending.pop(mine[k]), epoch)
                    k += 1
            if k == len(mine):
                return
        if k < len(mine):
            raise DataError(f"{self.dataset.root} ({self.dataset.split}): {len(mine) - k} batch(es) could not be "
                            "assembled from the shards (samples missing)")


class ShardsLoader(WorkerLoader):
    """Iterable of contract batches from packed shards, with ``len()``, ``set_epoch()`` and resumable state."""

    def __init__(self, dataset: Dataset, opts: LoaderOptions, device: str = "cpu"):
        super().__init__(dataset, opts, device)
        self._state = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, batches to skip) for workers
        workers = self.opts.workers if len(dataset) > 2 * self.opts.batch_size else 0
        workers = min(workers, len(self))
        self._loader = self._dataloader(_ShardStream(dataset, opts, self._state), workers, batch_size=None)

    def _begin(self, skip: int) -> bool:
        self._state[0], self._state[1] = self.epoch, skip
        return skip < len(self)
