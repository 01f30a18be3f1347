"""``inspect --similar`` search cost: the brute-force cosine top-K of ``inspection.similar.nearest`` over
memory-mapped embeddings, 1 to a few million rows.

Writes a float32 ``(n, D)`` ``.npy`` with the package's own appender (``embeddings.NpyRows``, as
``predict --embeddings`` does: rows appended in batches, the header rewritten after each), then times
``nearest`` for one query over the memory-mapped file (cold: after the write, with the page cache as the
kernel leaves it; then warm, repeated). Memory: the peak anonymous RSS (``RssAnon``, sampled every 10 ms:
the arrays the search allocates, not the file pages it maps, which the kernel can drop) above the baseline.
Writes benchmarks/results/similar-<host>.json.
Example: python -m benchmarks.bench_similar --rows 1000000,3000000 --dim 128
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

from benchmarks.common import command_line, machine_info, result_path, utc_timestamp, write_json_atomic


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


class _Peak:
    """The peak of RssAnon while the block runs."""

    def __enter__(self):
        self.base, self.peak, self.stop = _rss_anon_mb(), 0.0, False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.stop:
            self.peak = max(self.peak, _rss_anon_mb())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, _rss_anon_mb())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1000000,3000000", help="comma-separated row counts (default 1M,3M)")
    ap.add_argument("--dim", type=int, default=128, help="embedding dimension (default 128: small_cnn's)")
    ap.add_argument("--top", type=int, default=100, help="K (default 100)")
    ap.add_argument("--repeats", type=int, default=3, help="warm timed searches per size")
    ap.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.repeats = "20000", 1
    import numpy as np

    from dali_lens.embeddings import NpyRows
    from dali_lens.inspection.similar import CHUNK, nearest

    info = machine_info(with_gpu=False)
    runs = []
    rng = np.random.default_rng(0)
    for n in (int(v) for v in args.rows.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "emb.npy")
            t0 = time.perf_counter()
            rows = NpyRows(path, args.dim)
            for lo in range(0, n, 65536):
                rows.append(rng.standard_normal((min(65536, n - lo), args.dim), dtype=np.float32))
            rows.close()
            write_s = time.perf_counter() - t0
            vec = np.load(path, mmap_mode="r")
            assert vec.shape == (n, args.dim)
            times = []
            with _Peak() as mem:
                for k in range(args.repeats + 1):
                    t0 = time.perf_counter()
                    hits, sims = nearest([vec], n // 2, args.top)
                    times.append(time.perf_counter() - t0)
            assert hits[0] == n // 2 and sims[0] == 1.0 and len(hits) == args.top
            del vec
        run = {"rows": n, "dim": args.dim, "top": args.top, "chunk": CHUNK,
               "file_mb": round(n * args.dim * 4 / 2 ** 20, 1),
               "write_s": round(write_s, 2), "write_rows_per_s": round(n / write_s),
               "search_cold_s": round(times[0], 3), "search_warm_s": [round(t, 3) for t in times[1:]],
               "rows_per_s_warm": round(n / min(times[1:])), "peak_rss_anon_extra_mb": round(mem.peak - mem.base, 1),
               "loadavg": os.getloadavg()}
        runs.append(run)
        print(f"{n} x {args.dim}: write {write_s:.1f} s, search cold {times[0]:.2f} s, warm {min(times[1:]):.2f} s, "
              f"+{run['peak_rss_anon_extra_mb']} MB anonymous")
    doc = {"benchmark": "similar", "machine": info, "command": command_line(), "timestamp": utc_timestamp(),
           "what": "inspection.similar.nearest: brute-force cosine top-K over a memory-mapped float32 .npy",
           "notes": "write_s includes drawing the random vectors; search_cold_s is the first search after the "
                    "write (the file mostly in the page cache)",
           "runs": runs}
    out = result_path(args.out, "similar", info)
    write_json_atomic(out, doc)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
