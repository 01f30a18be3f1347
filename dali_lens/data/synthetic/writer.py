"""``generate_dataset``: simulate a data set chunk by chunk and write it in the standard or challenge layout.

Labels and splits are planned once for the whole set (exact lens count, exact stratified split sizes);
then every chunk is simulated and handed to the layout's writer (``StandardWriter``,
``ChallengeWriter``), whose files are written atomically by worker threads; the manifests and the
JSON record are written last, so an interrupted run is recognisable by their absence.
"""
from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np

from ..io import atomic_write_json
from .challenge import TRACKS, ChallengeWriter, _challenge_dirs, challenge_options
from .parameters import DEFAULT_DIFFICULTY, check_seed, simulation_settings
from .pool import default_workers
from .simulator import simulate
from .standard import SPLITS, StandardWriter, standard_options

LAYOUTS = ("standard", "challenge")


def generate_dataset(out: str | os.PathLike, n: int = 6000, size: int | None = None,
                     bands: Sequence[str] | str | None = None, fmt: str = "png", layout: str = "standard",
                     track: str = "ground", seed: int = 0, lens_fraction: float = 0.5,
                     splits: Sequence[float] = (0.7, 0.15, 0.15), overwrite: bool = False,
                     einstein_radius: tuple[float, float] = DEFAULT_DIFFICULTY["einstein_radius"],
                     source_mag: tuple[float, float] = DEFAULT_DIFFICULTY["source_mag"],
                     seeing: tuple[float, float] | None = None, pixel_scale: float | None = None,
                     psf: str = "gaussian", supersample: int = 2, chunk: int = 512, workers: int | None = None,
                     fsync: bool = False, progress: bool = False) -> dict[str, Any]:
    """Simulate ``n`` cutouts and write them in the standard or challenge layout of ``docs/DESIGN.md``.

    Standard layout (``standard``): ``out/{train,val,test}/{lens,nonlens}/<id>.<ext>``, the manifests
    ``out/{train,val,test}.csv`` and ``out/dataset.json``; ``fmt`` 'png' | 'jpeg' (1 or 3 bands), 'fits',
    'npy'. The lens count is exactly round(n * lens_fraction) and every split has an exact size (largest
    remainder of ``splits`` * n) and is stratified.

    Challenge layout (``challenge``, Metcalf et al. 2019): ``out/classifications.csv``, one FITS per band
    and sample in ``out/Public/...`` (``track`` 'space': EUC_VIS; 'ground': Band1..4 = R, I, G, U), 101 x
    101 px by default, ``out/generator.json``. ``bands``, ``fmt`` and ``splits`` do not apply.

    Refuses a non-empty ``out`` unless ``overwrite``; then only what the generator's own record there
    (``dataset.json``/``generator.json``, or the record a set being written keeps until it is complete) says it
    wrote is replaced, and a non-empty ``out`` without such a record is refused.
    Files are written atomically; the manifests last. Returns a summary dict (counts, seconds, rate).
    """
    t0 = time.perf_counter()
    out = os.fspath(out)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seed = check_seed(seed)
    if layout == "challenge":
        band_names, size = challenge_options(track, size)
        survey, fractions = track, None
    else:
        band_names, size, fractions = standard_options(fmt, bands, size, splits)
        survey = "ground"
    # validate the simulation settings before touching the disk
    st = simulation_settings(size, band_names, survey, psf, einstein_radius, source_mag, seeing, pixel_scale,
                             supersample, lens_fraction)
    sim_kw = dict(size=size, bands=band_names, seed=seed, einstein_radius=st["einstein_radius"],
                  source_mag=st["source_mag"], seeing=st["seeing"], pixel_scale=st["pixel_scale"], psf=psf,
                  survey=survey, supersample=supersample, workers=workers)
    _prepare_out(out, overwrite, layout)

    labels, split_of = _plan(n, st["lens_fraction"], fractions, seed)
    if layout == "challenge":
        writer = ChallengeWriter(out, track, band_names, seed, fsync)
    else:
        writer = StandardWriter(out, fmt, band_names, labels, split_of, fractions, fsync)
    _write_chunks(writer, labels, int(chunk), sim_kw, default_workers(workers), progress)

    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {"out": os.path.abspath(out), "n": n, "layout": layout, "seconds": seconds,
                               "cutouts_per_s": n / seconds if seconds > 0 else float("inf"),
                               "lens": int(labels.sum()), "nonlens": int(n - labels.sum())}
    writer.finish(summary, _record(layout, n, band_names, seed, survey, psf, st))
    _finish_record(out)
    summary["seconds"] = time.perf_counter() - t0
    summary["cutouts_per_s"] = n / summary["seconds"]
    return summary


def _write_chunks(writer: StandardWriter | ChallengeWriter, labels: np.ndarray, chunk: int,
                  sim_kw: dict[str, Any], n_workers: int, progress: bool) -> None:
    """Simulate the samples ``chunk`` at a time and hand each chunk to ``writer`` (files by worker threads)."""
    n = len(labels)
    writer.make_dirs()
    with _progress_bar(progress, n) as bar, _thread_pool(n_workers) as pool:
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            images, cat = simulate(hi - lo, is_lens=labels[lo:hi], start=lo, **sim_kw)
            writer.write_chunk(images, cat, pool, n_workers)
            if bar is not None:
                bar.update(hi - lo)


def _record(layout: str, n: int, bands: Sequence[str], seed: int, survey: str, psf: str,
            st: dict[str, Any]) -> dict[str, Any]:
    """The part of dataset.json / generator.json that both layouts share: the simulation's parameters."""
    return {
        "generator": _WRITTEN_BY, "layout": layout, "n": n, "size": st["size"],
        "bands": list(bands), "seed": int(seed), "lens_fraction": st["lens_fraction"],
        "survey": survey, "pixel_scale": st["pixel_scale"], "einstein_radius": list(st["einstein_radius"]),
        "source_mag": list(st["source_mag"]), "seeing": list(st["seeing"]), "psf": psf,
        "supersample": st["supersample"], "zeropoint": st["zeropoint"], "read_noise": st["read_noise"],
        "units": "sky-subtracted counts (a magnitude m gives 10**(-0.4*(m - zeropoint)) counts)",
    }


@contextmanager
def _progress_bar(progress: bool, n: int) -> Iterator[Any]:
    """A tqdm bar over ``n`` cutouts when ``progress`` (and tqdm is there), else None."""
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=n, unit="img", desc="generate", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


@contextmanager
def _thread_pool(n_workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """The writers' thread pool (None for one worker), shut down on exit."""
    pool = ThreadPoolExecutor(n_workers) if n_workers > 1 else None
    try:
        yield pool
    finally:
        if pool is not None:
            pool.shutdown()


def _split_counts(n: int, n_lens: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Exact split sizes (largest remainder) and, per split, an exact stratified number of lenses.

    lens_k = largest remainder of n_lens * size_k / n: each raw share is <= size_k, so its ceiling is too,
    and the non-lens counts size_k - lens_k are >= 0 and add up to n - n_lens.
    """
    f = np.asarray(fractions, dtype=np.float64)
    sizes = _largest_remainder(n, f / f.sum())
    lens = _largest_remainder(n_lens, sizes.astype(np.float64))
    return [(int(s), int(l)) for s, l in zip(sizes, lens)]


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    raw = total * w / w.sum() if w.sum() > 0 else np.zeros_like(w)
    base = np.floor(raw).astype(np.int64)
    rest = int(total - base.sum())
    order = np.argsort(-(raw - base), kind="stable")
    base[order[:rest]] += 1
    return base


def _plan(n: int, lens_fraction: float, fractions: Sequence[float] | None, seed: int):
    """Labels (n,) and split ids (n,) for samples 0..n-1: exact lens count, exact stratified split sizes."""
    rng = np.random.default_rng([int(seed), 2**31 - 1])
    n_lens = int(round(n * lens_fraction))
    labels = np.zeros(n, dtype=bool)
    labels[rng.permutation(n)[:n_lens]] = True
    split = np.zeros(n, dtype=np.int64)
    if fractions is not None:
        counts = _split_counts(n, n_lens, fractions)
        lens_idx = np.flatnonzero(labels)
        non_idx = np.flatnonzero(~labels)
        rng.shuffle(lens_idx)
        rng.shuffle(non_idx)
        lo_l = lo_n = 0
        for k, (size, nl) in enumerate(counts):
            split[lens_idx[lo_l:lo_l + nl]] = k
            split[non_idx[lo_n:lo_n + size - nl]] = k
            lo_l += nl
            lo_n += size - nl
    return labels, split


#: the generator's record of a set being written (removed once the set's own record, dataset.json or
#: generator.json, is written): what makes an interrupted set the generator's own
_RECORD = ".dali-lens-generating.json"
_WRITTEN_BY = "dali_lens.data.synthetic"
# the files each layout writes inside its folders (sample files and their atomic-write temporaries)
_SAMPLE_FILE = re.compile(r"\.?\d{6,}\.(png|jpg|fits|npy)(\.\d+\.\d+\.tmp)?")
_CHALLENGE_FILE = re.compile(r"\.?image[A-Za-z_]+-\d+\.fits(\.\d+\.\d+\.tmp)?")


def _recorded_layouts(out: str) -> list[str]:
    """The layouts the generator's own record in ``out`` says it wrote there (empty: no record, not ours)."""
    found = []
    for name, layout in ((_RECORD, None), ("dataset.json", "standard"), ("generator.json", "challenge")):
        try:
            with open(os.path.join(out, name), encoding="utf-8") as fh:
                rec = json.load(fh)
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("generator") == _WRITTEN_BY and rec.get("layout") in LAYOUTS:
            if layout in (None, rec["layout"]) and rec["layout"] not in found:
                found.append(rec["layout"])
    return found


def _remove_generated(out: str, layouts: list[str]) -> None:
    """--overwrite: remove what the generator wrote in ``out`` by its record (the layouts' sample files,
    manifests and records, and the folders this empties); every other file, and every folder holding one,
    stays."""
    def clear(folder: str, pattern: re.Pattern) -> None:
        if os.path.isdir(folder) and not os.path.islink(folder):
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if pattern.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path):
                    os.unlink(path)

    def prune(folder: str) -> None:
        if os.path.isdir(folder) and not os.path.islink(folder) and not os.listdir(folder):
            os.rmdir(folder)

    files = [_RECORD]
    if "standard" in layouts:
        for split in SPLITS:
            for cls in ("lens", "nonlens"):
                clear(os.path.join(out, split, cls), _SAMPLE_FILE)
                prune(os.path.join(out, split, cls))
            prune(os.path.join(out, split))
        files += [f"{split}.csv" for split in SPLITS] + ["dataset.json"]
    if "challenge" in layouts:
        public = os.path.join(out, "Public")
        dirs = {d for track in TRACKS for d, _ in _challenge_dirs(track)}
        for d in sorted(dirs):
            clear(os.path.join(public, d), _CHALLENGE_FILE)
            prune(os.path.join(public, d))
        prune(public)
        files += ["classifications.csv", "generator.json"]
    for name in files:
        path = os.path.join(out, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.unlink(path)


def _prepare_out(out: str, overwrite: bool, layout: str) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite`` and the generator's record says the set in it is the
    generator's (then remove only what it wrote); then record that this run is writing a set there."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose another directory or pass overwrite=True "
                                  "(--overwrite) to replace the generated dataset in it")
        layouts = _recorded_layouts(out)
        if not layouts:
            raise FileExistsError(f"{out} is not empty and holds no record of a set the generator wrote "
                                  "(dataset.json or generator.json); --overwrite replaces only a generated set, so "
                                  "nothing was touched: choose another directory")
        _remove_generated(out, layouts)
    os.makedirs(out, exist_ok=True)
    atomic_write_json(os.path.join(out, _RECORD), {"generator": _WRITTEN_BY, "layout": layout, "complete": False})


def _finish_record(out: str) -> None:
    """The set's own record is written: the record of a set being written goes."""
    try:
        os.unlink(os.path.join(out, _RECORD))
    except FileNotFoundError:
        pass


def format_summary(s: dict) -> str:
    """:func:`generate_dataset`'s summary as one line: N images, counts per split/class, seconds, cutouts/s."""
    if s["layout"] == "challenge":
        parts = f"challenge/{s['track']} ({','.join(s['bands'])}): {s['lens']} lens / {s['nonlens']} non-lens"
    else:
        per = ", ".join(f"{k} {v['n']} ({v['lens']} lens / {v['nonlens']} non-lens)" for k, v in s["splits"].items())
        parts = f"{s['format']} {','.join(s['bands'])}: {per}"
    return (f"wrote {s['n']} images to {s['out']}: {parts}; {s['seconds']:.1f} s, "
            f"{s['cutouts_per_s']:.0f} cutouts/s")
