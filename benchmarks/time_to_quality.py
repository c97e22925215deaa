"""
FID against minutes and against images seen, per setting and seed: which defaults reach good digits soonest.

    python benchmarks/time_to_quality.py --data_dir=<folder> [--epochs=10] [--seeds=0,1] [--only=0,2] [--plot]

Every run is the real script (`python dcgan_mnist.py --seed=S --epochs=E ...`) with only the setting's overrides
changed, run alone, one after another (never two at once: on a few cores they slow each other down). FID is
the script's own end-of-epoch evaluation, read back from last.ckpt; minutes are the sum of the epoch times
the script prints. Appends one JSON line per run to benchmarks/out/time_to_quality.jsonl, prints a markdown
table (mean over seeds), and with --plot draws docs/time_to_quality.png (FID against minutes, mean of seeds).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "dcgan_mnist.py")
RESULTS = os.path.join(HERE, "out", "time_to_quality.jsonl")

BEFORE_G_STEPS = ["--g_steps=1"]  # every setting but the last was measured with 1 G step, the default then
SETTINGS = {  # name: overrides of the script's defaults (after BEFORE_G_STEPS)
    "defaults": ["--lr_d=8e-4", "--lr_g=8e-4"],  # the defaults when this was measured (now 1.6e-3)
    # measured at commit 993652d, whose script had these options; they lost and were removed (docs/results.md)
    "lr decay over the 2nd half, G and D to 0.25": None,
    "lr decay over the 2nd half, D only to 0.25": None,
    "EMA 0.998 with StyleGAN2 ramp-up 0.05": None,
    "batch 64": ["--batch_size=64"],
    "lr 1.6e-3 both": ["--lr_d=1.6e-3", "--lr_g=1.6e-3"],
    "Adam betas (0.5, 0.99)": ["--betas=(0.5,0.99)"],
    "batch 64, lr 1.2e-3 both": ["--batch_size=64", "--lr_d=1.2e-3", "--lr_g=1.2e-3"],
    "batch 32": ["--batch_size=32"],
    "lr 2.4e-3 both": ["--lr_d=2.4e-3", "--lr_g=2.4e-3"],
    "lr 1.6e-3 both, Adam betas (0.5, 0.99)": ["--lr_d=1.6e-3", "--lr_g=1.6e-3", "--betas=(0.5,0.99)"],
    "lr 1.6e-3 both, one-sided label smoothing 0.9": ["--lr_d=1.6e-3", "--lr_g=1.6e-3", "--real_label=0.9"],
    "lr 1.6e-3 for G, 1.2e-3 for D": ["--lr_d=1.2e-3", "--lr_g=1.6e-3"],
    "lr 1.6e-3 for G, 2.4e-3 for D": ["--lr_d=2.4e-3", "--lr_g=1.6e-3"],
    "2 G steps per D step": ["--g_steps=2"],
}


def run(name, seed, epochs, data_dir):
    out = os.path.join(HERE, "out", f"ttq_{list(SETTINGS).index(name)}_seed{seed}_e{epochs}")
    cmd = [sys.executable, SCRIPT, f"--seed={seed}", f"--epochs={epochs}", "--early_stopping=1000",
           "--max_minutes=0", "--eval_every=1", f"--data_dir={data_dir}", f"--output_dir={out}", *BEFORE_G_STEPS,
           *SETTINGS[name]]  # a later --name=value wins
    result = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seconds = [int(s) for s in re.findall(r"^Epoch \[.*\((\d+)s\)$", result.stdout, re.M)]
    history = torch.load(os.path.join(out, "last.ckpt"), weights_only=True)["state"]["history"]
    batch = int(next((o.split("=")[1] for o in SETTINGS[name] if o.startswith("--batch_size=")), 128))
    return {"setting": name, "seed": seed, "epochs": epochs, "fid": history["fid"], "min_share": history["min_share"],
            "minutes": [sum(seconds[:i + 1]) / 60 for i in range(len(seconds))],
            "images": [70000 * (i + 1) for i in range(len(seconds))], "batch_size": batch}


def table(rows):
    """One row per setting: mean over its seeds of the FID at epochs 3, 5, 8 and the last, and of the best."""
    print("| setting | seeds | minutes | FID at epoch 3 | 5 | 8 | last | best (its epoch, per seed) | rarest digit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["setting"] for r in rows):
        runs = [r for r in rows if r["setting"] == name]
        at = [f"{statistics.mean(r['fid'][e - 1] for r in runs):.2f}" if e <= runs[0]["epochs"] else "-"
              for e in (3, 5, 8, runs[0]["epochs"])]
        best = " / ".join(f"{min(r['fid']):.2f} ({r['fid'].index(min(r['fid'])) + 1})" for r in runs)
        print(f"| {name} | {len(runs)} | {statistics.mean(r['minutes'][-1] for r in runs):.1f} | {' | '.join(at)} | "
              f"{statistics.mean(min(r['fid']) for r in runs):.2f}: {best} | {min(r['min_share'][-1] for r in runs):.1%} |")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(r["setting"] for r in rows):
        runs = [r for r in rows if r["setting"] == name]
        n = min(len(r["fid"]) for r in runs)
        minutes = [statistics.mean(r["minutes"][i] for r in runs) for i in range(n)]
        fids = [statistics.mean(r["fid"][i] for r in runs) for i in range(n)]
        ax.plot(minutes, fids, "o-", ms=3, label=f"{name} ({len(runs)} seeds)")
    ax.set_yscale("log")
    ax.set_xlabel("minutes of training")
    ax.set_ylabel("FID (LeNet features), mean of seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data_dir", default="MNIST/")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--only", default="", help="comma-separated numbers of settings to run (0-based)")
    p.add_argument("--plot", action="store_true", help="only draw docs/time_to_quality.png from the results")
    args = p.parse_args()
    if not args.plot:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        chosen = [n for i, n in enumerate(SETTINGS) if SETTINGS[n] is not None
                  and (not args.only or str(i) in args.only.split(","))]
        for seed in [int(s) for s in args.seeds.split(",")]:  # seed-major: a partial sweep covers every setting
            for name in chosen:
                with open(RESULTS, "a") as f:
                    f.write(json.dumps(run(name, seed, args.epochs, args.data_dir)) + "\n")
    rows = [json.loads(line) for line in open(RESULTS)]
    table(rows)
    if args.plot:
        plot(rows, os.path.join(HERE, "..", "docs", "time_to_quality.png"))


if __name__ == "__main__":
    main()
