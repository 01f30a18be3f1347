"""Packed sets (``python -m dali_lens.pack``): WebDataset tar shards whose members are PNG/JPEG or float32
``.npy`` (see ``data/shards.py``); sample paths are ``<shard>.tar#<member>``."""
from __future__ import annotations

import numpy as np

from ..dataset import get_kind, kind_of
from .base import Kind


class ShardsKind(Kind):
    name = "shards"
    packed = True
    checkpointable = True
    auto_cpu_backend = "dali-cpu"

    def read(self, sample, dataset) -> np.ndarray:
        """A member of a packed shard (random access through its index)."""
        from ..shards import read_packed

        return read_packed(sample)

    def pixels(self, dataset) -> Kind:
        """The kind the members are stored as: ``image`` (PNG/JPEG) or ``npy``."""
        return get_kind(kind_of(dataset.samples[0].path) or "npy") if dataset.samples else get_kind("npy")

    def dali_source(self, dataset, opts, gpu: bool, order: np.ndarray, reader_args: dict):
        """``fn.readers.webdataset`` over the shards and their DALI indexes.

        Outputs the pixels member (decoded by its kind: PNG/JPEG like loose images, ``.npy`` with DALI's numpy
        decoder) and the ``idx`` member (the sample's key number, an int64 that :meth:`dali_positions` maps to a
        position). The webdataset reader ignores ``shuffle_after_epoch``: training shuffles with its random
        buffer instead (``initial_fill`` samples, ``opts.shuffle_buffer``, default 1024) over shards that
        ``pack`` has already shuffled; each rank keeps its contiguous part of the samples. Files are read, not
        memory-mapped (``opts.mmap = True`` maps them)."""
        from nvidia.dali import fn, types

        from ..shards import shard_plan

        plan = shard_plan(dataset)
        paths, index_paths = plan.dali_files()
        # plain reads, not mmap: mapped shards would count in the process's RSS as they are read (gigabytes over
        # a survey-sized epoch, which RSS-based job limits kill), while read() data lives in buffers DALI reuses
        wds = dict(reader_args, stick_to_shard=True, shuffle_after_epoch=False, dont_use_mmap=not opts.mmap)
        if opts.train:
            fill = int(opts.shuffle_buffer)
            wds.update(random_shuffle=True, initial_fill=max(1, min(fill, len(dataset) // opts.num_shards)))
        raw, number = fn.readers.webdataset(paths=paths, index_paths=index_paths,
                                            ext=[plan.member.dali_member_exts, "idx"],
                                            dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
                                            **wds)
        return plan.member.dali_decode(raw, dataset, gpu), number

    def dali_positions(self, dataset, raw):
        """Key numbers from the packed ``idx`` members -> dataset positions."""
        import torch

        from ..shards import shard_plan

        return torch.from_numpy(shard_plan(dataset).positions(raw.reshape(-1).cpu().numpy()))


SHARDS = ShardsKind()
