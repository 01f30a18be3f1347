#!/usr/bin/env python
"""Render the committed loader benchmark results (benchmarks/results/loaders-*.json) as Markdown tables.

One table per results file (one machine): a row per configuration (format, image size, scales, batch), a
column per backend with images/s and, in parentheses, the peak host memory (MB, PSS summed over the process
and its DataLoader workers; with CUDA also the peak GPU MB). The machine line, the command and the CPU-target
verdict (dali-cpu >= 2x the mechine_lensing-style baseline on 64 px PNG -> 3 scales, with no more memory)
follow each table.

By default the Markdown is printed. ``--write README.md`` replaces the text between the markers
``<!-- bench:loaders:start -->`` and ``<!-- bench:loaders:end -->`` in that file (atomically) and leaves the
file untouched, with a warning, when the markers are missing.

  python -m benchmarks.render_table --write README.md        # from the repository root
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from benchmarks import common

START, END = "<!-- bench:loaders:start -->", "<!-- bench:loaders:end -->"
BACKEND_ORDER = ("dali", "dali-cpu", "torchvision", "torchvision-strong", "baseline", "baseline-tensor-decode")
FORMAT_ORDER = ("png", "jpeg", "npy", "fits")


def _cell(r: dict | None, with_gpu: bool) -> str:
    if r is None:
        return "–"
    if not r.get("ok"):
        return "failed"
    txt = f"{r['images_per_s']:,.0f} ({r['peak_host_mb']:,.0f} MB"
    if with_gpu and r.get("peak_gpu_mb") is not None:
        gpu = r.get("peak_gpu_device_mb") or r["peak_gpu_mb"]
        txt += f", GPU {gpu:,.0f} MB"
    return txt + ")"


def _versus(runs: list[dict], key: tuple, base: dict | None) -> str:
    """The fastest dali_lens run of a configuration against its strongest baseline, e.g. ``dali 5.1x
    torchvision-strong``; '–' without both."""
    ours = [r for r in runs if r.get("ok") and r["backend"] in ("dali", "dali-cpu")
            and (r["format"], r["size"], r["scale_mode"], r["batch"]) == key]
    if not ours or base is None:
        return "–"
    top = max(ours, key=lambda r: r["images_per_s"])
    return f"{column(top)} **{top['images_per_s'] / base['images_per_s']:.2f}x** {base['backend']}"


def _scales(r: dict) -> str:
    return "native" if r["scale_mode"] == "single" else "→ " + ",".join(str(s) for s in r["scales"])


def column(r: dict) -> str:
    """A run's column: its backend, with ``@threads`` where the run set DALI's CPU threads itself."""
    return r["backend"] + (f"@{r['threads']}" if r.get("threads") else "")


def render(doc: dict, name: str = "") -> str:
    runs = doc.get("runs", [])
    order = {b: i for i, b in enumerate(BACKEND_ORDER)}
    backends = sorted({column(r) for r in runs}, key=lambda c: (order.get(c.split("@")[0], 99), c))
    with_gpu = (doc.get("machine") or {}).get("gpu") is not None
    keys = sorted({(r["format"], r["size"], r["scale_mode"], r["batch"]) for r in runs},
                  key=lambda k: (FORMAT_ORDER.index(k[0]) if k[0] in FORMAT_ORDER else 99, k[1],
                                 k[2] != "single", k[3]))
    by = {(column(r), r["format"], r["size"], r["scale_mode"], r["batch"]): r for r in runs}
    best = common.strongest_baselines(runs)  # computed here from the runs, not read from the file
    machine = doc.get("machine") or {}
    lines = [f"**{common.machine_line(machine)}**" + (f" (`{name}`)" if name else ""), ""]
    lines.append("| format | size | scales | batch | " + " | ".join(backends) + " | fastest vs strongest baseline |")
    lines.append("|---|---:|---|---:|" + "---:|" * len(backends) + "---|")
    for k in keys:
        fmt, size, mode, batch = k
        sample = next(r for r in runs if (r["format"], r["size"], r["scale_mode"], r["batch"]) == k)
        cells = [_cell(by.get((b, *k)), with_gpu) for b in backends]
        lines.append(f"| {fmt} | {size} px | {_scales(sample)} | {batch} | " + " | ".join(cells) + " | "
                     + _versus(runs, k, best.get(k)) + " |")
    settings = doc.get("settings", {})
    lines.append("")
    lines.append(f"images/s over whole warm epochs ({settings.get('loader_mode', 'train')} mode, "
                 f"{settings.get('workers', '?')} workers/threads); in parentheses the peak host memory "
                 "(PSS of the process tree)" + (" and peak GPU memory" if with_gpu else "") +
                 f". {doc.get('timestamp', '')}, `{doc.get('command', '')}`")
    for t in doc.get("targets", []):
        if "config" not in t:
            continue  # the goal entries ({name, value, met}) repeat the table's last column
        verdict = "met" if t["met"] else "not met"
        lines.append(f"- CPU target ({t['config']}): dali-cpu {t['dali_cpu_images_per_s']:,.0f} vs baseline "
                     f"{t['baseline_images_per_s']:,.0f} images/s = **{t['speedup']:.2f}x** (target 2x), peak host "
                     f"{t['dali_cpu_peak_host_mb']:,.0f} vs {t['baseline_peak_host_mb']:,.0f} MB: **{verdict}**"
                     + (f" (CPU time per image, baseline / dali-cpu: {t['cpu_efficiency_ratio']:.2f}x)"
                        if t.get("cpu_efficiency_ratio") else ""))
    busy = [r.get("foreign_cpu_frac") for r in runs if r.get("foreign_cpu_frac") is not None]
    if busy and max(busy) > 0.1:
        lines.append(f"- note: other processes used up to {100 * max(busy):.0f}% of the CPUs during these runs "
                     "(`foreign_cpu_frac` in the JSON); absolute numbers are pessimistic")
    return "\n".join(lines)


def render_files(paths: list[str]) -> str:
    parts = []
    for p in paths:
        with open(p) as fh:
            doc = json.load(fh)
        if doc.get("benchmark", "loaders") != "loaders" or doc.get("mode") == "quick":
            continue
        parts.append(render(doc, os.path.relpath(p, common.ROOT)))
    return "\n\n".join(parts) if parts else "_no loader benchmark results yet: run `python -m benchmarks.bench_loaders`_"


def replace_between_markers(text: str, block: str) -> str | None:
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        return None
    return text[: i + len(START)] + "\n" + block + "\n" + text[j:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="result JSON files (default: benchmarks/results/loaders-*.json; "
                                            "files from --quick runs are skipped)")
    p.add_argument("--write", metavar="README", help="replace the text between the bench:loaders markers in this file")
    args = p.parse_args(argv)
    paths = args.files or sorted(glob.glob(os.path.join(common.RESULTS, "loaders-*.json")))
    md = render_files(paths)
    if not args.write:
        print(md)
        return 0
    if not os.path.exists(args.write):
        print(f"{args.write}: no such file", file=sys.stderr)
        return 2
    with open(args.write) as fh:
        text = fh.read()
    new = replace_between_markers(text, md)
    if new is None:
        print(f"{args.write}: markers {START} ... {END} not found; file left unchanged", file=sys.stderr)
        return 0
    if new != text:
        common.write_text_atomic(args.write, new)
    print(f"{args.write}: loader table updated ({len(paths)} result file(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
