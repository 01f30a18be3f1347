"""ResNet stems at one input size: training and inference throughput of the ImageNet stem (7x7 stride 2 +
max-pool) against the small-input stem (3x3 stride 1, no max-pool) that ``--stem auto`` picks for inputs of
96 px or less. The small stem keeps 16x the pixels through every block (4x per side), so it costs about 15x
the forward FLOPs (counted exactly with torch's FlopCounterMode, unlike timings on a busy machine).

    python -m benchmarks.bench_stem                      # resnet18, 96 px, 3 bands, batch 32
    python -m benchmarks.bench_stem --arch resnet34 --size 64 --device cuda
Writes benchmarks/results/stem-<gpu-or-host>.json (images/s per stem, the ratio, the machine, the command).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks import common


def measure(arch: str, stem: str, size: int, bands: int, batch: int, steps: int, device: str) -> dict:
    import torch

    from dali_lens.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, in_chans=bands, img_size=size, stem=stem).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch, bands, size, size, device=device)
    y = (torch.rand(batch, device=device) > 0.5).float()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def train_step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()

    def timed(fn, n):
        fn()  # warm-up
        sync()
        best = float("inf")
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        return batch / best

    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as flops:  # exact, unlike timings on a busy machine
        model(x[:1])
    model.train()
    train = timed(train_step, steps)
    model.eval()
    with torch.no_grad():
        infer = timed(lambda: model(x), steps)
    return {"train_images_per_s": round(train, 2), "inference_images_per_s": round(infer, 2),
            "forward_gflop_per_image": round(flops.get_total_flops() / 1e9, 3), "small_input": bool(model.small_input)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet34"))
    p.add_argument("--size", type=int, default=96, help="input size in px (default 96, the README's example)")
    p.add_argument("--bands", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement, best kept (default 3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny run (batch 4, 1 step): a smoke test")
    p.add_argument("--out", default=None, help="JSON output (default: benchmarks/results/stem-<gpu-or-host>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps = 4, 1
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = common.machine_info()
    load_before = os.getloadavg()[0]
    out = common.result_path(args.out, "stem", machine)
    results = {}
    for stem in ("imagenet", "small"):
        results[stem] = measure(args.arch, stem, args.size, args.bands, args.batch, args.steps, args.device)
        print(f"{args.arch} {args.size} px, {stem} stem: {results[stem]['train_images_per_s']} img/s training, "
              f"{results[stem]['inference_images_per_s']} img/s inference", flush=True)
    ratio = {k: round(results["imagenet"][k] / results["small"][k], 2)
             for k in ("train_images_per_s", "inference_images_per_s")}
    ratio["forward_gflop_small_over_imagenet"] = round(results["small"]["forward_gflop_per_image"]
                                                       / results["imagenet"]["forward_gflop_per_image"], 2)
    print(f"the small stem is {ratio['train_images_per_s']}x slower to train, "
          f"{ratio['inference_images_per_s']}x slower at inference, "
          f"{ratio['forward_gflop_small_over_imagenet']}x the forward FLOPs")
    doc = {"benchmark": "stem", "mode": "quick" if args.quick else "full", "command": common.command_line(),
           "timestamp": common.utc_timestamp(), "machine": machine,
           "settings": {"arch": args.arch, "size": args.size, "bands": args.bands, "batch": args.batch,
                        "steps": args.steps, "device": args.device, "threads": torch.get_num_threads()},
           "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
           "results": results, "imagenet_over_small": ratio}
    common.save_result(doc, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
