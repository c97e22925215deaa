"""
The GPU check: what a GPU needs measured, in one command that one `device` call runs (at most --minutes, 8, on one
H100/H200), in one Python process, with a summary file (--summary) beside its log:
  1. the precision and the machine's defaults (GPU_DEFAULTS);
  2. step_cost.py: a training step at the CPU's and the GPU's widths, kernel by kernel, and as a CUDA graph;
  3. the default run for seeds 0 and 1: minutes, FID per epoch (metrics.csv), and `evaluate` from two fresh seeds
     (each the mean of EVAL_DRAWS draws, as training's FID; the judge ships with the script);
  4. the conditional default, `dataset` (60,000 + 10,000 digits), and `evaluate` with the three outside readers;
  5. the whole test suite: started first, beside the rest, on half the CPU cores (the steps above keep the other
     half: a training step is bound by kernel launches, one core's work), in the time left; its log: --suite_log.

    python benchmarks/gpu_check.py --data_dir=<folder holding MNIST/raw/> [--out=<folder>] [--summary=<file>]
    python benchmarks/gpu_check.py --data_dir=<data> --cache_dir=<readers' cache> --dry   # every step, tiny, on CPU

MNIST/raw/ may hold the four files gzipped (*.gz): a device call carries at most 64 MiB, and the plain files
are 53 MiB; they are unpacked into <out>/data. The training runs use CUDA graphs (CUDA_GRAPHS, on by default on CUDA); a
run that fails with them is run again without, and says so. Exits 1 if a step failed.
"""
import argparse
import contextlib
import gzip
import importlib.util
import io
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


class Tee(io.TextIOBase):
    """stdout, copied into a buffer: what each step prints also goes into the summary."""
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def start_suite(data, log):
    """The whole test suite, started now in the background on the upper half of the CPU cores (this process keeps
    the lower half, so that the timings here are not those of a machine shared with it): (process, log)."""
    cores = sorted(os.sched_getaffinity(0))
    half = len(cores) // 2
    if half >= 4:
        os.sched_setaffinity(0, cores[:half])
        torch.set_num_threads(half)
    with open(log, "w") as f:
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10", "-rfE"], cwd=ROOT,
            stdout=f, stderr=subprocess.STDOUT,
            env={**os.environ, "DCGAN_DATA_DIR": data, "OMP_NUM_THREADS": str(half)},
            preexec_fn=(lambda: os.sched_setaffinity(0, cores[half:])) if half >= 4 else None)
    return process, log


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--cache_dir", default="", help="the outside readers' cache (default: <out>/cache)")
    p.add_argument("--out", default="", help="where the run's files go (default: a new temporary folder)")
    p.add_argument("--summary", default="", help="the summary file (default: <out>/summary.md)")
    p.add_argument("--minutes", type=float, default=8.0, help="the suite gets what is left of this")
    p.add_argument("--suite_log", default="", help="the test suite's log (default: <out>/suite.log)")
    p.add_argument("--dry", action="store_true", help="every step on the CPU, a few batches each")
    a = p.parse_args()
    start = time.time()
    out = a.out or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(out, exist_ok=True)
    summary = a.summary or os.path.join(out, "summary.md")
    data, cache, dev = unpacked(a.data_dir, out), a.cache_dir or os.path.join(out, "cache"), "cpu" if a.dry else "cuda"
    common = [f"--data_dir={data}", f"--device={dev}", f"--cache_dir={cache}"]
    tiny = ["--max_batches=3", "--batch_size=16", "--eval_every=1", "--eval_samples=200", "--eval_draws=1"]
    # dry: the GPU's defaults (GPU_DEFAULTS) named, tiny; on a GPU the script picks them itself
    run = [*tiny, "--epochs=2", "--ngf=16", "--ndf=16"] if a.dry else ["--max_minutes=2"]
    n_eval = ["--eval_samples=200", "--eval_draws=1"] if a.dry else []
    steps = ["--steps=1", "--rounds=1"] if a.dry else ["--steps=100", "--rounds=2"]
    only = "G64 D32,G64 D32 CUDA graphs" + ("" if a.dry else ",G128 D128,G128 D128 CUDA graphs")
    suite = None if a.dry else start_suite(data, a.suite_log or os.path.join(out, "suite.log"))
    no_graphs = []  # becomes ["--cuda_graphs=False"] if a run fails with CUDA graphs

    def train(*args):
        """A training run (dm.main); if it fails with CUDA graphs, again without them in a fresh folder."""
        began = time.time()
        try:
            dm.main([*common, *args, *no_graphs])
        except Exception:
            if no_graphs or dev != "cuda":
                raise
            print(f"(failed with CUDA graphs: {traceback.format_exc(limit=-2)})\nagain with --cuda_graphs=False")
            no_graphs.append("--cuda_graphs=False")
            args = [x + "_no_graphs" if x.startswith("--output_dir=") else x for x in args]
            began = time.time()
            dm.main([*common, *args, *no_graphs])
        return time.time() - began

    def precision():
        device = dm.pick_device(dev)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
        print(f"torch {torch.__version__}, {device} ({name}, capability {dm.capability(device)}): "
              f"{dm.precision(device)[1]}; defaults: {dm.machine_defaults(device.type, dm.capability(device)) or 'CPU'}")

    def metrics(folder):
        with open(os.path.join(folder, "metrics.csv")) as f:
            rows = [line.strip().split(",") for line in f]
        cols = rows[0]
        print("epoch  seconds  FID   digits")
        for r in rows[1:]:
            v = dict(zip(cols, r))
            print(f"{v['epoch']:>5} {v['seconds']:>8} {v['fid']:>6} {v['min_share']}-{v['max_share']}")

    def default_runs():
        for seed in (0,) if a.dry else (0, 1):  # dry: one of each, to keep the suite short
            folder = f"{out}/default_{seed}"
            minutes = train(f"--output_dir={folder}", f"--seed={seed}", *run) / 60
            folder += "_no_graphs" if no_graphs and os.path.isdir(folder + "_no_graphs") else ""
            print(f"the default run, seed {seed}: {minutes:.2f} min in all")
            metrics(folder)
            for draw in (100,) if a.dry else (100, 101):  # fresh draws: seeds the training's FID never used
                dm.main(["evaluate", *common, f"--output_dir={folder}", "--n_train=0", f"--seed={draw}", *n_eval])

    def conditional():
        folder = f"{out}/conditional"
        minutes = train(f"--output_dir={folder}", "--conditional=True", "--merge_test=False", *run) / 60
        folder += "_no_graphs" if no_graphs and os.path.isdir(folder + "_no_graphs") else ""
        print(f"the conditional default: {minutes:.2f} min in all")
        metrics(folder)
        began = time.time()
        dm.main(["dataset", *common, f"--output_dir={folder}", f"--dataset_dir={out}/fake_mnist", "--overwrite=True",
                 *(["--n=300", "--n_test=100"] if a.dry else [])])
        print(f"dataset: {time.time() - began:.0f} s")
        dm.main(["evaluate", *common, f"--output_dir={folder}", *n_eval, "--n_train=0" if a.dry else "--n_train=60000"])

    def tests():
        if a.dry:
            return print("(skipped with --dry: the suite is what runs --dry)")
        process, log = suite
        left = a.minutes * 60 - (time.time() - start) - 10
        try:
            process.wait(timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            process.kill()
            print(f"(the suite ran out of time: {time.time() - start:.0f} s after it started)")
        with open(log) as f:
            print("\n".join(f.read().splitlines()[-40:]))

    failed = []
    for title, step in (("1. precision and defaults", precision),
                        ("2. step_cost.py", lambda: benchmark("step_cost", f"--data_dir={data}", f"--device={dev}",
                                                              *steps, f"--only={only}")),
                        ("3. the default run, seeds 0 and 1", default_runs),
                        ("4. the conditional default, dataset and the readers", conditional),
                        ("5. the test suite", tests)):
        print(f"== {title}", flush=True)
        began, buffer = time.time(), io.StringIO()
        try:
            with contextlib.redirect_stdout(Tee(sys.stdout, buffer)):
                step()
        except (Exception, SystemExit) as e:  # one step failing must not cost the others' figures
            failed.append(title)
            print(f"({title} failed: {type(e).__name__} {e})\n{traceback.format_exc(limit=-3)}", flush=True)
            buffer.write(f"FAILED: {type(e).__name__} {e}\n")
        print(f"({title}: {time.time() - began:.0f} s)", flush=True)
        with open(summary, "a") as f:  # after each step: a run cut short still leaves what it measured
            f.write(f"## {title} ({time.time() - began:.0f} s)\n```\n{buffer.getvalue().strip()}\n```\n\n")
    print(f"gpu_check done in {(time.time() - start) / 60:.1f} min: {out}, summary {summary}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
