"""
Which noise std should `dataset` draw with? Train-on-fake accuracy of one generator at several stds.

    python benchmarks/dataset_noise.py --ckpt=outputs/G_model.ckpt --data_dir=../shared/data [--stds=1,1.5,2,2.5]
        [--filter=False] [--draws=2]

For each std: 60,000 labeled digits drawn the way `dataset` draws them (dcgan_mnist.labeled_fakes: the
asked-for digits of a conditional G, kept where the judge reads them unless --filter=False, the judge's
reading for an unconditional one), a classifier of the judge's architecture trained on them the judge's
way, and its accuracy on the 10,000 real test digits (dcgan_mnist.train_reader, judge_accuracy). Also the
judge's label accuracy on the set (conditional G; 100% with the filter, unless G is too weak to fill it).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dcgan_mnist as dm  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data_dir", default=dm.DATA_DIR)
    p.add_argument("--stds", default="1,1.5,2,2.5")
    p.add_argument("--n", type=int, default=60000)
    p.add_argument("--filter", default=str(dm.DATASET_FILTER), help="keep the digits the judge reads as asked")
    p.add_argument("--draws", type=int, default=1, help="sets per std, with different noise (draw-to-draw spread)")
    args = p.parse_args()
    device = dm.pick_device("auto")
    mnist = dm.load_mnist(args.data_dir)
    judge = dm.load_shipped("judge", device)
    G = dm.load_generator(args.ckpt, dm.NOISE_DIM, device)
    real = dm.judge_accuracy(judge, mnist.test_images, mnist.test_labels, device)
    print(f"{args.ckpt}: train-on-real (the judge) {real:.2%}")
    filtered = args.filter.lower() in ("true", "1", "yes")
    cfg = dict(dm.parse_args([])[0], dataset_agree=0.0)  # the judge alone filters here
    print(f"judge filter: {filtered}\n| noise std | draw | train-on-fake | gap (points) | judge reads the label |\n"
          "| --- | --- | --- | --- | --- |")
    for std, draw in ((float(s), d) for s in args.stds.split(",") for d in range(args.draws)):
        seed = dm.SEED + dm.SEED_OFFSET_DATASET + 100 * draw  # draw 0: the set `dataset` writes
        images, labels = dm.labeled_fakes(G, args.n, dict(cfg, dataset_noise=std, dataset_filter=0.5 * filtered), device, seed,
                                          (judge, None))
        accuracy = dm.judge_accuracy(dm.train_reader("judge", images, labels, device), mnist.test_images,
                                     mnist.test_labels, device)
        with torch.no_grad():
            read = torch.cat([judge(dm.to_float(x.to(device))).argmax(1).cpu() for x in images.split(1000)])
        print(f"| {std:g} | {draw} | {accuracy:.2%} | {100 * (accuracy - real):+.2f} | {(read == labels).float().mean():.2%} |",
              flush=True)


if __name__ == "__main__":
    main()
