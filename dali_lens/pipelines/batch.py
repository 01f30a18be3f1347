"""The batch contract shared by every backend, and the checks applied to every batch.

A batch is ``{"image": {scale: Tensor(B, C, s, s)}, "label": LongTensor(B,), "index": LongTensor(B,)}``;
with test-time augmentation each image tensor is ``(B, 8, C, s, s)`` (the 8 dihedral transforms).
``label`` is -1 for unlabelled samples; ``index`` points into ``dataset.samples``.

With injection (``LoaderOptions.inject``, issue 25) a batch also has ``"injected": BoolTensor(B,)``: True where
the loader painted a simulated arc onto the sample (a non-lens or unlabelled background), whose ``label`` is
then 1; batches of loaders without injection have no ``injected`` key.
"""
from __future__ import annotations

import torch

from ..data.dataset import DataError, Dataset


def dihedral8(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 8, C, H, W): the identity, 3 rotations, and the 4 of them transposed."""
    rots = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return torch.stack(rots + [r.transpose(-2, -1) for r in rots], dim=1)


class BatchChecker:
    """Turns raw backend outputs into the contract, checking every sample and naming bad files."""

    def __init__(self, dataset: Dataset, device: torch.device | str, tta: bool = False, check_finite: bool = True):
        self.dataset = dataset
        self.labels = torch.tensor(dataset.labels, dtype=torch.long, device=device)
        self.tta = tta
        self.check_finite = check_finite

    def name(self, index: int) -> str:
        s = self.dataset.samples[index]
        return s.path if not s.band_paths else f"object {s.id} ({s.path})"

    def __call__(self, images: dict[int, torch.Tensor], index: torch.Tensor,
                 shapes: torch.Tensor | None = None, injected: torch.Tensor | None = None) -> dict:
        index = index.reshape(-1).long()
        if shapes is not None and self.dataset.shape is not None:
            expected = torch.tensor([*self.dataset.shape, self.dataset.bands], dtype=shapes.dtype, device=shapes.device)
            bad = (shapes.reshape(len(index), -1)[:, :3] != expected).any(1)
            if bad.any():
                i = int(bad.nonzero()[0, 0])
                got = shapes.reshape(len(index), -1)[i].tolist()
                raise DataError(f"{self.name(int(index[i]))}: decoded as {got[0]}x{got[1]} px with {got[2]} band(s); "
                                f"the dataset has {self.dataset.shape[0]}x{self.dataset.shape[1]} px, "
                                f"{self.dataset.bands} band(s)")
        if self.check_finite:
            largest = images[max(images)]
            # a NaN/inf anywhere makes a sample's float32 sum non-finite: one cheap reduction per batch, and
            # the exact per-element test only when something is wrong
            if largest.is_floating_point() and not bool(torch.isfinite(largest.reshape(len(index), -1).float().sum(1)).all()):
                finite = torch.isfinite(largest.reshape(len(index), -1)).all(1)
                if not bool(finite.all()):
                    i = int((~finite).nonzero()[0, 0])
                    raise DataError(f"{self.name(int(index[i]))}: contains NaN/inf values "
                                    "(set a mask value to replace them by 0)")
        if self.tta:
            images = {s: dihedral8(t) for s, t in images.items()}
        index = index.to(self.labels.device)
        batch = {"image": images, "label": self.labels[index], "index": index}
        if injected is not None:  # issue 25: painted backgrounds are lenses
            injected = injected.reshape(-1).to(self.labels.device).bool()
            batch["label"] = torch.where(injected, torch.ones_like(batch["label"]), batch["label"])
            batch["injected"] = injected
        return batch
