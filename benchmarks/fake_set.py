"""
Which fake set trains a classifier best? Draws labeled fake sets from trained conditional generators the way
`dataset` does (noise std, judge filter DATASET_FILTER, second builder DATASET_AGREE, DATASET_CENTER) and
scores each by the outside readers (dcgan_mnist.READERS: classifiers of other families than the judge, which
had no part in building the set):
- train-on-fake: the reader trained on the 60,000 generated digits, its accuracy on the 10,000 real test
  digits, beside the same reader trained on the real training digits (gap in points);
- labels: how often the reader trained on real digits reads the generated digits as their label.

    python benchmarks/fake_set.py --data_dir=<data> --ckpts=run_a/G_model.ckpt,run_b/G_model.ckpt \
        [--stds=1.0,1.5,2.0] [--filters=0.999,0] [--agrees=0.9,0] [--centers=1,0] [--n=60000] [--seeds=0,1,2]
        [--readers=mlp,vgg]

A generator may be several in equal shares (Mixture), joined by "+": --ckpts=seed0/G_model.ckpt+seed1/G_model.ckpt.
Prints one line per (generator, std, filter, agree, center, draw) and appends it to benchmarks/out/fake_set.jsonl.
A draw (--seeds) is the set `dataset --seed=D` writes.
"""
import argparse
import itertools
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import dcgan_mnist as dm  # noqa: E402


class Mixture(torch.nn.Module):
    """Several generators as one: each draws an equal share of every batch (and of every digit, as the digits
    are asked for in shuffled order). Measured at commit c6c869e (docs/results.md): the averaged G of a run's
    last three epochs, mixed, trained no better classifier than the last one alone; so it is no option of the script."""
    def __init__(self, Gs):
        super().__init__()
        self.Gs, self.n_classes = torch.nn.ModuleList(Gs), Gs[0].n_classes

    def forward(self, z, y=None):
        ys = y.chunk(len(self.Gs)) if y is not None else [None] * len(self.Gs)
        return torch.cat([G(z_part, y_part) for G, z_part, y_part in zip(self.Gs, z.chunk(len(self.Gs)), ys)])


def load(ckpt, device):
    Gs = [dm.load_generator(path, dm.NOISE_DIM, device) for path in ckpt.split("+")]
    return Gs[0] if len(Gs) == 1 else Mixture(Gs).eval()


def score(images, labels, mnist, readers, device):
    row = {}
    for name, on_real in readers.items():
        real_acc = dm.judge_accuracy(on_real, mnist.test_images, mnist.test_labels, device)
        fake_acc = dm.judge_accuracy(dm.train_reader(name, images, labels, device), mnist.test_images,
                                    mnist.test_labels, device)
        agree = dm.judge_accuracy(on_real, images, labels, device)
        row[name] = {"gap": round(100 * (fake_acc - real_acc), 2), "fake": fake_acc, "real": real_acc,
                     "labels": agree}
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data_dir", required=True)
    p.add_argument("--ckpts", required=True)
    p.add_argument("--stds", default="1.0,1.5,2.0")
    p.add_argument("--filters", default="0.999,0", help="DATASET_FILTER values")
    p.add_argument("--agrees", default=str(dm.DATASET_AGREE), help="DATASET_AGREE values (used where a filter is)")
    p.add_argument("--centers", default=str(int(dm.DATASET_CENTER)), help="DATASET_CENTER values (1 or 0)")
    p.add_argument("--n", type=int, default=60000)
    p.add_argument("--seeds", default="0", help="draws of each set: dataset's --seed")
    p.add_argument("--readers", default=",".join(dm.READERS), help="which of dcgan_mnist.READERS score the sets")
    a = p.parse_args()
    device = torch.device("cpu")
    mnist = dm.load_mnist(a.data_dir)
    judge = dm.load_shipped("judge", device)
    readers = {name: dm.get_reader(dm.CACHE_DIR, mnist, device, name) for name in a.readers.split(",")}
    builder = dm.load_shipped("resnet", device)
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    for ckpt in a.ckpts.split(","):
        G = load(ckpt, device)
        for std in map(float, a.stds.split(",")):
            for filtered in map(float, a.filters.split(",")):
                agrees = map(float, a.agrees.split(",") if filtered else ["0"])
                for agree, center, seed in itertools.product(agrees, map(int, a.centers.split(",")),
                                                             map(int, a.seeds.split(","))):
                    t = time.time()
                    images, labels = dm.labeled_fakes(G, a.n, dict(dm.parse_args([])[0], dataset_noise=std,
                                                      dataset_filter=filtered, dataset_agree=agree, dataset_center=bool(center)),
                                                      device, seed + dm.SEED_OFFSET_DATASET, (judge, builder))
                    row = {"ckpt": ckpt, "std": std, "filter": filtered, "agree": agree, "center": center, "n": a.n,
                           "draw": seed, **score(images, labels, mnist, readers, device)}
                    row["seconds"] = round(time.time() - t)
                    print(json.dumps(row), flush=True)
                    with open(os.path.join(HERE, "out", "fake_set.jsonl"), "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
