"""Rebuild the shipped classifiers (judges/): the FID judge (a LeNet) and the ResNet that `dataset` filters with.

    python benchmarks/build_judges.py --data_dir=<folder with MNIST/raw/> [--out=judges_rebuilt] [--n=60000]

Each is trained by dcgan_mnist.py's own recipe (train_reader: its optimizer, epochs and seed) on the first --n of
MNIST's training digits, in float32 on the CPU, then written to <out>/<name>.pt with its test accuracy: the judge in
float32 (740 KB), the ResNet in float16 (800 KB; it still computes in float32). The script prints each file's
SHA-256: dcgan_mnist.py loads a classifier only if its SHA-256 is the one in SHIPPED, so a rebuilt file becomes
the yardstick only when copied into judges/ and SHIPPED is edited (FIDs of two judges do not compare). Where the shipped judge is at hand, it
then says how far the rebuilt judge's FIDs are from the shipped one's on the same digits.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dcgan_mnist as dm  # noqa: E402

CPU = torch.device("cpu")
STORAGE = {"judge": torch.float32, "resnet": torch.float16}  # each file at most 1 MiB


def build(name, mnist, n, out):
    start = time.time()
    model = dm.train_reader(name, mnist.train_images[:n], mnist.train_labels[:n], CPU)
    accuracy = dm.judge_accuracy(model, mnist.test_images, mnist.test_labels, CPU)
    state = {k: v.to(STORAGE[name]) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = os.path.join(out, f"{dm.CLASSIFIERS[name].file}.pt")
    dm.atomic_save({"model": state, "test_accuracy": accuracy}, path)
    print(f"{path}: test accuracy {accuracy:.2%}, {os.path.getsize(path) / 1024:.0f} KB, "
          f"{time.time() - start:.0f} s; sha256 {dm.file_sha256(path)}", flush=True)
    return path


def load(path, name):
    model = dm.CLASSIFIERS[name].build()
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def compare(rebuilt, shipped, mnist, g_ckpt=None, n=10000):
    """FIDs of the same n digits against the same n test digits, by both judges: real training digits (the floor),
    blurred test digits, and a generator's digits if given."""
    test = dm.to_float(mnist.test_images[:n])
    sets = {f"{n:,} real training digits": dm.to_float(mnist.train_images[:n]),
            "the test digits, blurred (3x3)": F.avg_pool2d(F.pad(test, (1,) * 4, value=-1), 3, stride=1)}
    if g_ckpt:
        G = dm.load_generator(g_ckpt, dm.NOISE_DIM, CPU)
        sets[f"{n:,} digits of {g_ckpt}"] = dm.generate(G, n, dm.NOISE_DIM, CPU, seed=100)
    for what, images in sets.items():
        fids = []
        for judge in (shipped, rebuilt):
            ref = dm.feature_stats(dm.judge_outputs(judge, test, CPU)[0])
            fids.append(dm.quality(*dm.judge_outputs(judge, images, CPU), ref)["fid"])
        print(f"FID of {what}: shipped judge {fids[0]:.3f}, rebuilt {fids[1]:.3f} "
              f"({100 * (fids[1] / fids[0] - 1):+.1f}%)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=dm.DATA_DIR)
    p.add_argument("--out", default="judges_rebuilt", help="folder for the rebuilt files (default: judges_rebuilt)")
    p.add_argument("--n", type=int, default=60000, help="training digits (default: all 60,000)")
    p.add_argument("--which", default="judge,resnet", help="comma-separated: judge, resnet")
    p.add_argument("--g_ckpt", default="", help="also compare the two judges' FIDs of this generator's digits")
    p.add_argument("--compare_n", type=int, default=10000, help="digits per set in the comparison (default 10,000)")
    args = p.parse_args()
    mnist = dm.load_mnist(args.data_dir)
    os.makedirs(args.out, exist_ok=True)
    print(f"Training on {min(args.n, len(mnist.train_images)):,} training digits, float32 on the CPU "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}", flush=True)
    paths = {name: build(name, mnist, args.n, args.out) for name in args.which.split(",")}
    shipped = dm.shipped_path("judge")
    if "judge" in paths and os.path.isfile(shipped) and os.path.abspath(shipped) != os.path.abspath(paths["judge"]):
        compare(load(paths["judge"], "judge"), load(shipped, "judge"), mnist, args.g_ckpt, args.compare_n)


if __name__ == "__main__":
    main()
