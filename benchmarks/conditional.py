"""
How should the label enter a conditional DCGAN, and how much mode seeking should it get? Measured, held
out (G trains on the 60,000 training digits).

    python benchmarks/conditional.py --data_dir=../shared/data [--epochs=3] [--seeds=0] [--only=NAME,...]

Each setting trains dcgan_mnist.py's conditional GAN in-process (its defaults, `--conditional=True
--merge_test=False`) for `--epochs` epochs, then scores the final averaged G (G_ema) the way `evaluate`
does: FID against the 10,000 test digits, the judge's mean confidence (real digits: about 99.2%; higher
means digits more alike than real ones), label accuracy (the judge reads the digit G was asked for), and
train-on-fake accuracy (a judge-architecture classifier trained the judge's way on 60,000 generated
labeled digits, tested on the 10,000 real test digits). Prints a markdown table. Runs go to benchmarks/out/.

Settings:
- "channels": the plainest conditional DCGAN: the one-hot label as 10 extra input channels of G, and as
  10 constant 28x28 maps concatenated to D's input image.
- "projection" (what dcgan_mnist.py does): the same G; D sees the image only, and the label adds its own
  4x4 filter to D's last layer (Miyato & Koyama 2018).
- "projection_ms1", "projection_ms3": projection plus the mode-seeking term in G's loss with weight 1 (the
  default MODE_SEEKING) or 3 (Mao et al. 2019): G is rewarded for drawing two different digits of one
  label from two noise vectors. "channels" and "projection" run with MODE_SEEKING = 0.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import dcgan_mnist as dm  # noqa: E402

ProjectionD = dm.Discriminator


class ChannelsD(dm.Discriminator):
    """The label as 10 constant maps beside the image: D's first conv takes 1 + 10 channels."""

    def __init__(self, n_classes=0):
        super().__init__(0)
        self.n_classes = n_classes
        self.main[0] = nn.Conv2d(1 + n_classes, 64, 4, 2, 1, bias=False)

    def forward(self, x, y=None):
        maps = F.one_hot(y, self.n_classes).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
        return self.main(torch.cat([x, maps], 1))


SETTINGS = {"channels": (ChannelsD, 0.0), "projection": (ProjectionD, 0.0),  # name: (D, MODE_SEEKING)
            "projection_ms1": (ProjectionD, 1.0), "projection_ms3": (ProjectionD, 3.0)}


def run(name, seed, epochs, data_dir, mnist, judge, device):
    cfg = {k.lower(): getattr(dm, k) for k in dm.CONFIG_NAMES}
    out = os.path.join(HERE, "out", f"conditional_{name}_seed{seed}")
    cfg.update(conditional=True, merge_test=False, epochs=epochs, seed=seed, data_dir=data_dir,
               output_dir=out, max_minutes=0.0, early_stopping=100, mode_seeking=SETTINGS[name][1])
    dm.Discriminator = SETTINGS[name][0]
    start = time.time()
    history = dm.train(cfg)
    minutes = (time.time() - start) / 60
    dm.Discriminator = ProjectionD
    G = dm.Generator(cfg["noise_dim"], dm.N_CLASSES).to(device)
    G.load_state_dict(torch.load(os.path.join(out, "last.ckpt"), map_location=device, weights_only=True)["G_ema"])
    G.eval()
    images, labels = dm.labeled_fakes(G, 60000, dict(cfg, dataset_noise=1.0, dataset_filter=0.0), device,
                                      seed + dm.SEED_OFFSET_DATASET)
    tstr = dm.judge_accuracy(dm.train_reader("judge", images, labels, device), mnist.test_images, mnist.test_labels, device)
    return {"fid": history["fid"][-1], "confidence": history["confidence"][-1],
            "label_accuracy": history["label_accuracy"][-1], "tstr": tstr, "minutes": minutes}


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--data_dir", default=dm.DATA_DIR)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0")
    p.add_argument("--only", default="")
    args = p.parse_args()
    device = dm.pick_device("auto")
    mnist = dm.load_mnist(args.data_dir)
    judge = dm.load_shipped("judge", device)
    real = dm.judge_accuracy(judge, mnist.test_images, mnist.test_labels, device)
    names = args.only.split(",") if args.only else list(SETTINGS)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for name in names:
        results = [run(name, seed, args.epochs, args.data_dir, mnist, judge, device) for seed in seeds]
        mean = {k: statistics.mean(r[k] for r in results) for k in results[0]}
        rows.append(f"| {name} | {args.epochs} | {mean['fid']:.2f} | {mean['confidence']:.2%} | "
                    f"{mean['label_accuracy']:.2%} | {mean['tstr']:.2%} ({100 * (mean['tstr'] - real):+.2f}) | "
                    f"{mean['minutes']:.1f} |")
        print(rows[-1], flush=True)
    print(f"\nseeds {seeds}; train-on-real (the judge): {real:.2%}")
    print("| setting | epochs | FID | judge confidence | label accuracy | train-on-fake (gap) | minutes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
