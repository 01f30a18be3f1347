"""The strong-lens-finding challenge layout (Metcalf et al. 2019, A&A 625, A119): one FITS file per band.

```
ROOT/classifications.csv            ID,is_lens,einstein_area,numb_pix_lensed_image,flux_lensed_image_in_sigma
ROOT/Public/Band1/imageSDSS_R-<ID>.fits ... Band4/imageSDSS_U-<ID>.fits     ground track, 4 bands
ROOT/Public/EUC_VIS/imageEUC_VIS-<ID>.fits                                  space track, 1 band
```
(``Public/`` may be omitted.) The ground track is read in Band1..Band4 order.
"""
from __future__ import annotations

import csv
import os
import re

from .dataset import DataError, Dataset, Sample

GROUND_DIRS = ("Band1", "Band2", "Band3", "Band4")
SPACE_DIRS = ("EUC_VIS",)
_ID = re.compile(r"-(\d+)\.fits?$", re.IGNORECASE)


def _base(root: str) -> str:
    pub = os.path.join(root, "Public")
    return pub if os.path.isdir(pub) else root


def is_challenge_layout(root: str) -> bool:
    if not os.path.isfile(os.path.join(root, "classifications.csv")):
        return False
    base = _base(root)
    return any(os.path.isdir(os.path.join(base, d)) for d in GROUND_DIRS + SPACE_DIRS)


def _files_by_id(folder: str) -> dict[str, str]:
    out = {}
    for name in os.listdir(folder):
        m = _ID.search(name)
        if m:
            out[m.group(1)] = os.path.join(folder, name)
    return out


def read_challenge(root: str, track: str | None = None) -> dict[str, Dataset]:
    """Describe a challenge-layout folder as a single ``train`` split of per-band FITS samples."""
    root = os.path.abspath(root)
    base = _base(root)
    if track is None:
        track = "ground" if os.path.isdir(os.path.join(base, GROUND_DIRS[0])) else "space"
    dirs = GROUND_DIRS if track == "ground" else SPACE_DIRS
    missing_dirs = [d for d in dirs if not os.path.isdir(os.path.join(base, d))]
    if missing_dirs:
        raise DataError(f"{base}: {track} track needs band folders {list(dirs)}; missing {missing_dirs}")
    per_band = [_files_by_id(os.path.join(base, d)) for d in dirs]
    catalogue = os.path.join(root, "classifications.csv")
    samples = []
    with open(catalogue, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "ID" not in cols:
            raise DataError(f"{catalogue}: no 'ID' column (columns: {cols})")
        for lineno, row in enumerate(reader, start=2):
            oid = str(int(float(row["ID"])))
            paths = []
            for d, files in zip(dirs, per_band):
                if oid not in files:
                    raise DataError(f"object {oid} ({catalogue}, line {lineno}): no file in {d}/")
                paths.append(files[oid])
            label = None
            if row.get("is_lens", "") != "":
                label = 1 if float(row["is_lens"]) > 0 else 0
            meta = {}
            for c in cols:
                if c in ("ID", "is_lens"):
                    continue
                try:
                    meta[c] = float(row[c])
                except (TypeError, ValueError):
                    pass
            samples.append(Sample(paths[0], label, oid, band_paths=tuple(paths), meta=meta))
    if not samples:
        raise DataError(f"{catalogue}: lists no objects")
    from .readers import read_sample

    ds = Dataset(samples, bands=len(dirs), kind="fits-bands", root=root, split="train")
    first = read_sample(samples[0], ds, check=False)
    ds.shape = (int(first.shape[1]), int(first.shape[2]))
    return {"train": ds}


#: Masked pixels in the challenge's files hold this value: the default ``--mask-value`` for this layout.
MASK_VALUE = 100.0


def default_mask_value(dataset: Dataset) -> float | None:
    """The sentinel of masked pixels that ``dataset``'s layout implies (the challenge's 100), else None."""
    return MASK_VALUE if dataset.kind == "fits-bands" and is_challenge_layout(dataset.root) else None
