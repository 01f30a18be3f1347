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

from .dataset import DataError, Dataset, Sample, catalogue_value, parse_label
from .io import open_text

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


def _expected_path(files: dict[str, str], oid: str) -> str:
    """The path object ``oid``'s file would have in a band folder, named like the folder's other files."""
    other = next(iter(files.values()))
    folder, name = os.path.split(other)
    m = _ID.search(name)
    return os.path.join(folder, name[:m.start()] + f"-{oid}" + name[m.end(1):])


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
    with open_text(catalogue, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "ID" not in cols:
            raise DataError(f"{catalogue}: no 'ID' column (columns: {cols})")
        for lineno, row in enumerate(reader, start=2):
            where = f"{catalogue}, line {lineno}"
            try:
                oid = str(int(float(row["ID"])))
            except (TypeError, ValueError, OverflowError):
                raise DataError(f"{where}: ID {row['ID']!r} is not a number") from None
            paths = []
            for d, files in zip(dirs, per_band):
                if oid not in files:
                    if not files:
                        raise DataError(f"object {oid} ({where}): no file in {d}/")
                    # kept with the name it would have: reported by check and the loaders, skipped by --skip-bad
                    paths.append(_expected_path(files, oid))
                    continue
                paths.append(files[oid])
            label = parse_label(row.get("is_lens") or "", f"{where}, is_lens", binary=True)
            meta = {c: v for c in cols if c not in ("ID", "is_lens") and (v := catalogue_value(row[c])) is not None}
            samples.append(Sample(paths[0], label, oid, band_paths=tuple(paths), meta=meta))
    if not samples:
        raise DataError(f"{catalogue}: lists no objects")
    from .readers import reference_layout

    ds = Dataset(samples, bands=len(dirs), kind="fits-bands", root=root, split="train")
    ds.shape = reference_layout(ds)[1]
    return {"train": ds}


#: Masked pixels in the challenge's files hold this value: the default ``--mask-value`` for this layout.
MASK_VALUE = 100.0


def default_mask_value(dataset: Dataset) -> float | None:
    """The sentinel of masked pixels that ``dataset``'s layout implies (the challenge's 100), else None."""
    return MASK_VALUE if dataset.data_kind.one_file_per_band and is_challenge_layout(dataset.root) else None
