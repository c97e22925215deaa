"""
The GPU check: every figure a GPU needs, in one command that one `device` call runs (at most 8 minutes on one
H100/H200), in one Python process:
  1. the precision line (device, dtype and why);
  2. the CPU-independent tests, on the GPU machine's torch (a subprocess, cut at 150 s);
  3. bench_train.py on the device (the tutorial's loop against ours);
  4. step_cost.py on the device: widths, the plain layout, torch.compile, and compile with CUDA graphs
     (mode="reduce-overhead");
  5. the default run, timed, with its FID per epoch (metrics.csv), and `evaluate` on a fresh draw.

    python benchmarks/gpu_check.py --data_dir=<folder holding MNIST/raw/> [--out=<folder>]
    python benchmarks/gpu_check.py --data_dir=<data> --cache_dir=<judge cache> --dry   # every step, tiny, on CPU

MNIST/raw/ may hold the four files gzipped (*.gz): a device call carries at most 64 MiB, and the plain files
are 53 MiB; they are unpacked into <out>/data. Exits 1 if a step failed.
"""
import argparse
import gzip
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dcgan_mnist as dm  # noqa: E402


def benchmark(name, *args):
    """benchmarks/<name>.py's main() with these command-line arguments, in this process."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.argv = [spec.origin, *args]
    module.main()


def unpacked(data_dir, out):
    """data_dir, or <out>/data holding its gzipped MNIST files unpacked."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    packed = [f for f in os.listdir(raw) if f.endswith(".gz")] if os.path.isdir(raw) else []
    if not packed:
        return data_dir
    os.makedirs(os.path.join(out, "data", "MNIST", "raw"), exist_ok=True)
    for name in packed:
        with gzip.open(os.path.join(raw, name)) as src, open(os.path.join(out, "data", "MNIST", "raw", name[:-3]),
                                                             "wb") as dst:
            shutil.copyfileobj(src, dst)
    return os.path.join(out, "data")


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--cache_dir", default="", help="judge cache (default: <out>/cache: the judge is trained once)")
    p.add_argument("--out", default="", help="where the run's files go (default: a new temporary folder)")
    p.add_argument("--dry", action="store_true", help="every step on the CPU, a few batches each")
    a = p.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="gpu_check_")
    data, cache, dev = unpacked(a.data_dir, out), a.cache_dir or os.path.join(out, "cache"), "cpu" if a.dry else "cuda"
    run = ["--epochs=1", "--max_batches=3", "--batch_size=16", "--eval_every=1", "--eval_samples=200",
           "--eval_draws=1"] if a.dry else []
    steps = ["--steps=1", "--rounds=1"] if a.dry else ["--steps=30", "--rounds=3"]
    only = "G64 D32" if a.dry else ("G64 D64,G64 D64 plain layout,G64 D32,G32 D32,G64 D32 compile,"
                                    "G64 D32 compile CUDA graphs")
    common = [f"--data_dir={data}", f"--device={dev}", f"--cache_dir={cache}"]

    def precision():
        device = dm.pick_device(dev)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
        print(f"torch {torch.__version__}, {device} ({name}): {dm.precision(device)[1]}")

    def tests():
        if a.dry:
            return print("(skipped with --dry: the suite is what runs --dry)")
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                 "tests/test_machines.py", "tests/test_speed.py", "tests/test_core.py"], cwd=ROOT,
                                capture_output=True, text=True, timeout=150, env={**os.environ, "DCGAN_DATA_DIR": data})
        print("\n".join(result.stdout.splitlines()[-3:]))

    def default_run():
        start = time.time()
        dm.main([*common, f"--output_dir={out}/run", *run])
        print(f"the default run: {time.time() - start:.0f} s in all (the judge's training included, on a first run)")
        dm.main(["evaluate", *common, f"--output_dir={out}/run", "--n_train=0", "--seed=1",
                 "--n=200" if a.dry else "--n=10000"])
        shutil.copy(os.path.join(out, "run", "metrics.csv"), os.path.join(out, "metrics.csv"))

    failed = []
    for title, step in (("1. precision", precision), ("2. tests", tests),
                        ("3. bench_train.py", lambda: benchmark("bench_train", f"--data_dir={data}",
                                                                f"--device={dev}", *steps)),
                        ("4. step_cost.py", lambda: benchmark("step_cost", f"--data_dir={data}", f"--device={dev}",
                                                              *steps, f"--only={only}")),
                        ("5. the default run", default_run)):
        print(f"== {title}", flush=True)
        start = time.time()
        try:
            step()
        except (Exception, SystemExit) as e:  # one step failing must not cost the others' figures
            failed.append(title)
            print(f"({title} failed: {type(e).__name__} {e})\n{traceback.format_exc(limit=-3)}", flush=True)
        print(f"({title}: {time.time() - start:.0f} s)", flush=True)
    print(f"gpu_check done: {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
