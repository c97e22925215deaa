"""
The cost of one training batch (the script's own train_one_epoch) for several settings, interleaved, with its
FLOP count: how far each is from the machine's limit, and what a default run costs per epoch.

    python benchmarks/step_cost.py --data_dir=../shared/data [--device=auto] [--steps=15] [--rounds=3] [--no_amp]
        [--only="G64 D64,G64 D32"]

On CUDA, the "CUDA graphs" settings record the step as a CUDA graph after 3 batches (CUDA_GRAPHS), once per
train_one_epoch call: give --steps well above 3 (100+) for the steady cost; the others run it kernel by kernel.

Each round trains `steps` batches of every setting in turn (after one warm-up round), so slow spells of a
shared machine hit all alike; medians of the rounds are printed. FLOPs: torch.utils.flop_counter on one batch
(convolutions and matmuls, forward and backward; a multiply-add counts 2).
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dcgan_mnist as dm  # noqa: E402

SETTINGS = {  # name: overrides of the script's defaults (G: NGF, D: NDF)
    "G64 D64": {"ndf": 64},  # the tutorial's widths (the default before NDF = 32)
    "G64 D64 plain layout": {"ndf": 64, "channels_last": False},
    "G64 D64 1 G step": {"ndf": 64, "g_steps": 1},
    "G64 D32": {},  # the default
    "G64 D48": {"ndf": 48},
    "G48 D48": {"ngf": 48, "ndf": 48},
    "G48 D32": {"ngf": 48, "ndf": 32},
    "G32 D32": {"ngf": 32, "ndf": 32},
    "G32 D32 1 G step": {"ngf": 32, "ndf": 32, "g_steps": 1},
    "G128 D128": {"ngf": 128, "ndf": 128},  # GPU_DEFAULTS' widths
    "G64 D32 CUDA graphs": {"cuda_graphs": True},  # CUDA: the step recorded once and replayed (CUDA_GRAPHS)
    "G128 D128 CUDA graphs": {"ngf": 128, "ndf": 128, "cuda_graphs": True},
}


def batch_flops(data, gan, cfg, amp):
    with FlopCounterMode(display=False) as counter:
        dm.train_one_epoch(data, dm.training_step(gan, cfg, amp, data.images.device), dm.TrainState(), cfg, 1)
    return counter.get_total_flops()


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--data_dir", default=dm.DATA_DIR)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no_amp", action="store_true", help="float32 on any machine")
    p.add_argument("--only", default="", help="comma-separated setting names")
    args = p.parse_args()
    device = dm.pick_device(args.device)
    base, _, _ = dm.parse_args([f"--data_dir={args.data_dir}", f"--amp={not args.no_amp}"])
    amp, why = dm.precision(device, base["amp"])
    mnist = dm.load_mnist(args.data_dir)
    data = dm.Data(torch.cat([mnist.train_images, mnist.test_images]).to(device),
                   torch.cat([mnist.train_labels, mnist.test_labels]).to(device))
    names = [n for n in SETTINGS if n in args.only.split(",") or not args.only]
    runs = {}
    for name in names:
        cfg = dict(base, **SETTINGS[name])
        torch.manual_seed(0)
        gan = dm.build_models(cfg, device)
        plain = dict(cfg, cuda_graphs=False)  # FLOPs counted eagerly: a CUDA graph changes no FLOP
        runs[name] = (cfg, gan, batch_flops(data, dm.build_models(plain, device), plain, amp))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device={device} ({why}) capability={torch.backends.cpu.get_cpu_capability()} "
          f"threads={torch.get_num_threads()} steps={args.steps} rounds={args.rounds}")
    times = {n: [] for n in names}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in [n for n in names if n in runs]:
            cfg, gan, _ = runs[name]
            sync()
            t = time.perf_counter()
            try:
                step = dm.training_step(gan, cfg, amp, data.images.device)
                dm.train_one_epoch(data, step, dm.TrainState(), cfg, args.steps)
            except Exception as e:  # one setting failing must not cost the others' figures
                print(f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})")
                del runs[name]
                continue
            sync()
            if r:
                times[name].append((time.perf_counter() - t) / args.steps)
    batches = -(-len(data.images) // base["batch_size"])
    print(f"{'setting':<22} {'s/batch':>8} {'GFLOP/batch':>12} {'GFLOP/s':>8} {'min/epoch':>10} {'vs 1st':>7}")
    ref = statistics.median(times[names[0]]) if names[0] in runs else math.nan
    for name in [n for n in names if n in runs]:
        s = statistics.median(times[name])
        gflop = runs[name][2] / 1e9
        print(f"{name:<22} {s:8.4f} {gflop:12.1f} {gflop / s:8.1f} {s * batches / 60:10.2f} {s / ref:7.2f}")


if __name__ == "__main__":
    main()
