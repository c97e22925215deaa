"""
What a whole default run costs, old defaults against new, measured interleaved so that the slow and
fast spells of a shared machine hit both alike (two runs one after the other can differ by a third).

    python benchmarks/run_cost.py --data_dir=../shared/data [--conditional] [--device=cpu] [--steps=40] [--rounds=6]

old: the defaults of commit 9010c73 (1 G step, one FID draw per epoch, 30 epochs); new: today's
(G_STEPS=2, EVAL_DRAWS=2, EPOCHS=7). --conditional: the conditional defaults on the 60,000 training
digits (--merge_test=False), old 30 epochs of mode seeking 1 against today's CONDITIONAL_DEFAULTS (1 G
step, 10 epochs) with two draws; the weight of the mode-seeking term does not change the cost. The old
runs are also shown capped by MAX_MINUTES, as the script caps them. Each round runs `steps` batches of
train_one_epoch and one end-of-epoch evaluation (BatchNorm refresh and FID) of each, and projects a run:
epochs x (batches per epoch x seconds per batch + seconds per evaluation). The learning rate does not
change the cost, so both use today's. Prints each round, then the medians and the median ratio.
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dcgan_mnist as dm  # noqa: E402

SETUPS = {"old": dict(g_steps=1, eval_draws=1, epochs=30), "new": dict(g_steps=2, eval_draws=2, epochs=7)}
CONDITIONAL_SETUPS = {"old": dict(g_steps=1, eval_draws=1, epochs=30, mode_seeking=1.0),
                      "new": dict(dm.CONDITIONAL_DEFAULTS, eval_draws=2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", default=dm.DATA_DIR)
    ap.add_argument("--conditional", action="store_true", help="the conditional defaults (held out)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=40, help="batches per round and setting")
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds, after one warm-up round")
    args = ap.parse_args()
    cfg, _, _ = dm.parse_args([f"--data_dir={args.data_dir}", f"--max_batches={args.steps}",
                               f"--conditional={args.conditional}", f"--merge_test={not args.conditional}"])
    setups = CONDITIONAL_SETUPS if args.conditional else SETUPS
    device = torch.device(args.device)
    amp = dm.precision(device, cfg["amp"])[0]
    # the script's own setup: its data (70,000 digits, or 60,000 held out), the judge, and fresh models
    data, judging, gan, _, _ = dm.setup_training(cfg, {"eval_every"}, None, device)
    batches_per_epoch = math.ceil(len(data.images) / cfg["batch_size"])
    minutes = {name: [] for name in setups}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, setup in setups.items():
            c = dict(cfg, **setup)
            t = time.time()
            dm.train_one_epoch(data, dm.training_step(gan, c, amp, data.images.device), dm.TrainState(), c, args.steps)
            per_batch = (time.time() - t) / args.steps
            t = time.time()
            dm.refresh_bn_stats(gan.G_ema, c["noise_dim"], device, seed=1)
            dm.measure(gan.G_ema, c, judging, device)
            evaluation = time.time() - t
            run = c["epochs"] * (batches_per_epoch * per_batch + evaluation) / 60
            if r:
                minutes[name].append(run)
            print(f"round {r} {name}: {per_batch * 1000:.0f} ms per batch, {evaluation:.1f} s per evaluation, "
                  f"run {run:.1f} min", flush=True)
    for label, cap in (("", math.inf), (f" (old capped at MAX_MINUTES={cfg['max_minutes']:g})", cfg["max_minutes"])):
        old = [min(m, cap) for m in minutes["old"]]
        ratios = [new / o for o, new in zip(old, minutes["new"])]
        print(f"projected run{label}, medians: old {statistics.median(old):.1f} min, new "
              f"{statistics.median(minutes['new']):.1f} min; new/old {statistics.median(ratios):.1%} "
              f"(rounds {min(ratios):.1%}-{max(ratios):.1%})")


if __name__ == "__main__":
    main()
