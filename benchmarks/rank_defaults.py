"""
Rank optimizer / sampling settings by FID at the same training budget, two seeds each.

    python benchmarks/rank_defaults.py --data_dir=../shared/data [--epochs=2] [--seeds=0,1] [--only=NAME,...]

Every run is the real script (`python dcgan_mnist.py ...`) with only the overrides below changed, for
`--epochs` full epochs (70,000 images each); the FID, score and digit shares are the script's own
end-of-epoch evaluation (10,000 samples vs the 10,000 test images, LeNet features), read back from
last.ckpt. Prints a markdown table (mean over seeds, and each seed). Runs go to benchmarks/out/.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "dcgan_mnist.py")

PAPER = ["--lr_d=2e-4", "--lr_g=2e-4", "--betas=(0.5,0.999)"]
SETTINGS = {
    "tutorial: lr 1e-3, betas (0.9, 0.999), plain G": ["--lr_d=1e-3", "--lr_g=1e-3", "--betas=(0.9,0.999)",
                                                       "--ema_decay=0"],
    "DCGAN paper: lr 2e-4, betas (0.5, 0.999), plain G": PAPER + ["--ema_decay=0"],
    "paper + EMA 0.999": PAPER + ["--ema_decay=0.999"],
    "paper + EMA, float32 (no bf16 autocast)": PAPER + ["--ema_decay=0.999", "--amp=False"],
    "paper + EMA + TTUR (D 4e-4, G 1e-4)": ["--lr_d=4e-4", "--lr_g=1e-4", "--betas=(0.5,0.999)",
                                            "--ema_decay=0.999"],
    "paper + EMA, lr 4e-4 both": ["--lr_d=4e-4", "--lr_g=4e-4", "--betas=(0.5,0.999)", "--ema_decay=0.999"],
    "paper + EMA + label smoothing 0.9": PAPER + ["--ema_decay=0.999", "--real_label=0.9"],
    "paper + EMA, batch 64": PAPER + ["--ema_decay=0.999", "--batch_size=64"],
    "lr 4e-4 both, betas (0.5, 0.999), plain G": ["--lr_d=4e-4", "--lr_g=4e-4", "--betas=(0.5,0.999)",
                                                  "--ema_decay=0"],
    "lr 8e-4 both, betas (0.5, 0.999) + EMA": ["--lr_d=8e-4", "--lr_g=8e-4", "--betas=(0.5,0.999)",
                                               "--ema_decay=0.999"],
}


def run(name, overrides, seed, epochs, data_dir, device):
    out = os.path.join(HERE, "out", f"{list(SETTINGS).index(name)}_seed{seed}")
    cmd = [sys.executable, SCRIPT, f"--seed={seed}", f"--epochs={epochs}", "--max_minutes=0", "--eval_every=1",
           "--sample_every=1000", f"--data_dir={data_dir}", f"--output_dir={out}", f"--device={device}",
           "--g_steps=1", *overrides]  # 1 G step per D step: the default when this was measured
    start = time.time()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    history = torch.load(os.path.join(out, "last.ckpt"), weights_only=True)["state"]["history"]
    return {k: history[k][-1] for k in ("fid", "score", "min_share")} | {"minutes": (time.time() - start) / 60}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data_dir", default="MNIST/")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--device", default="auto")
    p.add_argument("--only", default="", help="comma-separated numbers of settings to run (0-based)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [n for i, n in enumerate(SETTINGS) if not args.only or str(i) in args.only.split(",")]
    rows = []
    for name in chosen:
        results = [run(name, SETTINGS[name], s, args.epochs, args.data_dir, args.device) for s in seeds]
        fids = [r["fid"] for r in results]
        row = (f"| {name} | {args.epochs} | {statistics.mean(fids):.1f} | {' / '.join(f'{f:.1f}' for f in fids)} | "
               f"{statistics.mean(r['score'] for r in results):.2f} | "
               f"{min(r['min_share'] for r in results):.1%} | {statistics.mean(r['minutes'] for r in results):.1f} |")
        rows.append(row)
        print(row, flush=True)
    print("\n| setting | epochs | FID (mean) | FID per seed | score | rarest digit | minutes/run |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
