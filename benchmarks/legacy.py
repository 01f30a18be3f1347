"""The "before dali-lens" baseline: mechine_lensing's legacy multi-scale loading and training step.

What bench_loaders.py (``baseline``, ``baseline-tensor-decode``), profile_dali_cpu.py and
bench_multiscale_memory.py (``baseline``, ``--baseline-step legacy``) compare dali_lens against:

* :class:`LegacyMultiScaleDataset` / :func:`build_baseline`: a torch Dataset that opens each image with PIL
  and, for every requested scale separately, applies ``Resize((s, s)) + ToTensor + Normalize`` (float data:
  astropy / numpy, then Resize + Normalize per scale), collated by a DataLoader with worker processes.
* :class:`StrongMultiScaleDataset` / :func:`build_strong`: not legacy, the strongest plain torchvision
  ``DataLoader`` a user would write today (tensor decode, ``transforms.v2`` with antialias, pin_memory,
  persistent workers, the same augmentation): ``torchvision-strong`` in bench_loaders.py.
* :func:`legacy_train_epoch`: its ``MultiScaleTrainer.train_epoch`` in standard mode (every scale forwarded,
  one backward over the averaged losses).

This module imports torch: the benchmarks' parent processes, which must not, import it only in their children.
"""
from __future__ import annotations

import sys
import time

from torch.utils.data import Dataset as TorchDataset

from benchmarks.common import MEAN, STD


class LegacyMultiScaleDataset(TorchDataset):
    """mechine_lensing-style legacy multi-scale loading: decode once, then per scale a separate
    ``Compose([Resize((s, s)), ToTensor(), Normalize(mean, std)])``; returns ``({s: (C,s,s)}, label, index)``.
    """

    def __init__(self, items: list[tuple[str, int]], kind: str, scales, mean, std, tensor_decode: bool = False):
        from torchvision import transforms as T
        import torch

        self.items, self.kind, self.scales, self.tensor_decode = items, kind, tuple(scales), tensor_decode
        if kind == "image" and not tensor_decode:
            self.tfms = {s: T.Compose([T.Resize((s, s)), T.ToTensor(), T.Normalize(mean, std)]) for s in scales}
        elif kind == "image":
            self.tfms = {s: T.Compose([T.Resize((s, s), antialias=True), T.ConvertImageDtype(torch.float32),
                                       T.Normalize(mean, std)]) for s in scales}
        else:  # float arrays are already tensors: no ToTensor scaling
            self.tfms = {s: T.Compose([T.Resize((s, s), antialias=True), T.Normalize(mean, std)]) for s in scales}

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, path: str):
        import numpy as np
        import torch

        if self.kind == "image":
            if self.tensor_decode:
                from torchvision.io import ImageReadMode, decode_image, read_file

                return decode_image(read_file(path), mode=ImageReadMode.RGB)
            from PIL import Image

            with Image.open(path) as im:
                return im.convert("RGB")
        if self.kind == "npy":
            return torch.from_numpy(np.load(path).astype(np.float32, copy=False))
        from astropy.io import fits

        with fits.open(path, memmap=False) as hdul:
            planes = [np.asarray(h.data, dtype=np.float32) for h in hdul if h.data is not None]
        return torch.from_numpy(np.stack(planes) if len(planes) > 1 else planes[0][None])

    def __getitem__(self, i: int):
        path, label = self.items[i]
        img = self._load(path)
        return {"image": {s: self.tfms[s](img) for s in self.scales}, "label": label, "index": i}


def build_baseline(dataset, scales, batch_size: int, cuda: bool, tensor_decode: bool, workers: int, train: bool):
    from torch.utils.data import DataLoader

    items = [(s.path, -1 if s.label is None else int(s.label)) for s in dataset.samples]
    ds = LegacyMultiScaleDataset(items, dataset.kind, scales, [MEAN] * dataset.bands, [STD] * dataset.bands,
                                 tensor_decode=tensor_decode)
    return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=cuda,
                      multiprocessing_context="fork" if workers > 0 and sys.platform == "linux" else None)


class StrongMultiScaleDataset(TorchDataset):
    """The torchvision pipeline a user would write today (the *strong* baseline, ``torchvision-strong``): the
    file's bytes decoded once to a uint8 tensor (``torchvision.io.decode_image``; ``.npy`` with numpy), the
    training augmentation drawn once per sample and shared by every scale (a random one of the 8 rotations /
    flips, as the project's loaders do with ``max_shift=0``), then per scale ``transforms.v2.Resize((s, s),
    antialias=True)`` on the uint8 tensor and ``ToDtype(float32, scale=True)`` + ``Normalize``; returns
    ``({s: (C,s,s)}, label, index)``. Images only and ``.npy`` (float data skips the uint8 scaling)."""

    def __init__(self, items: list[tuple[str, int]], kind: str, scales, mean, std, train: bool, seed: int = 0):
        import torch
        from torchvision.transforms import v2

        if kind not in ("image", "npy"):
            raise ValueError(f"torchvision-strong reads PNG/JPEG and .npy, not {kind}")
        self.items, self.kind, self.scales, self.train, self.seed = items, kind, tuple(scales), train, seed
        self.resize = {s: v2.Resize((s, s), antialias=True) for s in self.scales}
        to_float = [v2.ToDtype(torch.float32, scale=True)] if kind == "image" else []
        self.finish = v2.Compose([*to_float, v2.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import numpy as np
        import torch

        path, label = self.items[i]
        if self.kind == "image":
            from torchvision.io import ImageReadMode, decode_image, read_file

            img = decode_image(read_file(path), mode=ImageReadMode.RGB)
        else:
            img = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32, copy=False))
        if self.train:  # one of the 8 dihedral transforms, the same for every scale
            k, flip = int(torch.randint(4, ())), bool(torch.randint(2, ()))
            img = torch.rot90(img, k, (1, 2))
            img = img.flip(-1) if flip else img
        return {"image": {s: self.finish(self.resize[s](img)) for s in self.scales}, "label": label, "index": i}


def build_strong(dataset, scales, batch_size: int, cuda: bool, workers: int, train: bool):
    """The strong torchvision baseline's DataLoader: ``workers`` processes (the usable cores), persistent,
    ``pin_memory`` with CUDA, prefetch 4 batches per worker, shuffle + drop_last when training."""
    from torch.utils.data import DataLoader

    items = [(s.path, -1 if s.label is None else int(s.label)) for s in dataset.samples]
    ds = StrongMultiScaleDataset(items, dataset.kind, scales, [MEAN] * dataset.bands, [STD] * dataset.bands, train)
    return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=cuda, prefetch_factor=4 if workers > 0 else None,
                      multiprocessing_context="fork" if workers > 0 and sys.platform == "linux" else None)


def legacy_train_epoch(member, loader, device, scales, on_step=None) -> dict:
    """mechine_lensing's multi-scale training step (``MultiScaleTrainer.train_epoch``, standard mode).

    Its ``_group_scales_by_memory`` puts 64, 112 and 224 (the benchmarks' ``scales``) in one group ((s/224)^2 sums to 1.33 < its budget
    of 2.0), so every scale is forwarded, the losses averaged, and one backward pass made: the autograd graphs
    of all three scales are alive at once. dali_lens's ``train_epoch`` keeps one scale's graph at a time.
    Same model, optimizer (AdamW) and schedule as the dali_lens member, so only the step differs.
    """
    import torch.nn.functional as F

    m = member
    m.model.train()
    steps, seen, total, wait, t0 = 0, 0, 0.0, 0.0, time.perf_counter()
    fetch = t0
    for batch in loader:
        wait += time.perf_counter() - fetch
        y = batch["label"].to(device).float()
        loss = 0.0
        for s in scales:
            z = m.model(batch["image"][s].to(device, non_blocking=True)).float()
            loss = loss + F.binary_cross_entropy_with_logits(z, y)
        loss = loss / len(scales)
        m.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        m.optimizer.step()
        m.scheduler.step()
        total += float(loss.detach())
        steps += 1
        seen += len(y)
        if on_step is not None:
            on_step(steps)
        fetch = time.perf_counter()
    elapsed = time.perf_counter() - t0
    return {"loss": {"legacy": total / max(1, steps)}, "steps": steps, "samples": seen, "seconds": elapsed,
            "images_per_s": seen / max(elapsed, 1e-9), "data_wait_fraction": wait / max(elapsed, 1e-9)}
