"""Shared fixtures. Tests read the real MNIST at $DCGAN_DATA_DIR, else ../shared/data (next to the repo),
else torchvision's default download folder (a user's machine with internet)."""
import contextlib
import ctypes
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dcgan_mnist as dm  # noqa: E402

SCRIPT = os.path.join(ROOT, "dcgan_mnist.py")

# glibc gives every freed block over 32 MB (the judge's activations of 1,000 digits, distance matrices) back to the
# system, and the next one faults its pages in again: a sixth of the suite's time. The tests keep blocks up to 256 MiB
# for reuse, in this process and in the scripts they start. (The script does not: its memory would grow by up to 3x.)
os.environ.update(MALLOC_MMAP_THRESHOLD_=str(1 << 28), MALLOC_TRIM_THRESHOLD_=str(1 << 28))
with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, Windows): nothing to do
    for option in (-3, -1):  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        ctypes.CDLL("libc.so.6").mallopt(option, 1 << 28)


def find_data_dir():
    if os.environ.get("DCGAN_DATA_DIR"):
        return os.environ["DCGAN_DATA_DIR"]
    shared = os.path.join(ROOT, "..", "shared", "data")
    return shared if os.path.isdir(shared) else os.path.join(ROOT, "MNIST")


DATA_DIR = find_data_dir()
# G and D at a quarter of the default widths (NGF=64, NDF=32): the same code, a step 3.5 times faster on a CPU. For the
# small runs of resuming, signals, files, float16 and the conditional mode, where the width changes nothing; the smoke
# run, the seed test and the numeric checks keep the script's defaults.
NARROW = ["--ngf=16", "--ndf=16"]


@pytest.fixture(scope="session")
def mnist():
    return dm.load_mnist(DATA_DIR)


@pytest.fixture(scope="session")
def few_tests_dir(tmp_path_factory, mnist):
    """A --data_dir with MNIST's 60,000 training digits (links to the real files: the readers' cache applies) and its
    first 1,000 test digits, so that what scores every test digit (evaluate's readers) takes a tenth of the time."""
    raw = tmp_path_factory.mktemp("few_tests") / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in dm.RAW_FILES[:2]:
        os.symlink(os.path.join(os.path.abspath(DATA_DIR), "MNIST", "raw", name), raw / name)
    (raw / dm.RAW_FILES[2]).write_bytes(dm.idx_header(2051, (1000, 28, 28)) + mnist.test_images[:1000].numpy().tobytes())
    (raw / dm.RAW_FILES[3]).write_bytes(dm.idx_header(2049, (1000,)) + mnist.test_labels[:1000].to(torch.uint8).numpy().tobytes())
    return str(raw.parent.parent)


@pytest.fixture(scope="session")
def reader_cache(tmp_path_factory, mnist):
    """A cache folder for the whole test session where get_reader() finds evaluate's outside readers trained on the
    real digits: to keep the suite short, on 4,000 digits (vgg: 2,000) instead of the script's 60,000. The judge and
    the ResNet builder need none: they ship with the script (judges/)."""
    cache = str(tmp_path_factory.mktemp("reader_cache"))
    for name in dm.READERS:
        n = {"vgg": 2000}.get(name, 4000)  # fewer for the costly one
        model = dm.train_reader(name, mnist.train_images[:n], mnist.train_labels[:n], torch.device("cpu"))
        dm.atomic_save({"model": model.state_dict()}, dm.reader_path(cache, mnist, name))
    return cache


@pytest.fixture(scope="session", autouse=True)
def real_digits_judged_once():
    """dm.real_outputs (the judge's outputs of a folder's 20,000 real digits, 2 s on a CPU) computed once per test
    session for each judge, digits, device and precision: every run in this process would compute them again. A cache,
    not a stand-in: the first call for each is the script's own."""
    memo, real_outputs = {}, dm.real_outputs

    def once(judge, mnist, device):
        digest = hashlib.sha256(mnist.test_images.numpy().tobytes())
        digest.update(mnist.train_images[:10000].numpy().tobytes())
        for value in judge.state_dict().values():
            digest.update(value.cpu().numpy().tobytes())
        key = (digest.hexdigest(), str(device), torch.is_autocast_enabled(torch.device(device).type))
        if key not in memo:
            memo[key] = real_outputs(judge, mnist, device)
        return memo[key]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dm, "real_outputs", once)
        yield


@pytest.fixture(scope="session")
def judge():
    return dm.load_shipped("judge", torch.device("cpu"))


def config(**overrides):
    """The script's defaults, with overrides, as train() takes them."""
    cfg = {name.lower(): getattr(dm, name) for name in dm.CONFIG_NAMES}
    cfg.update(data_dir=DATA_DIR, device="cpu")
    if overrides.get("conditional"):  # as parse_args does
        cfg.update(dm.CONDITIONAL_DEFAULTS)
    cfg.update(overrides)
    return cfg


def run_script(*args, timeout=600, env=None):
    """Run dcgan_mnist.py in a subprocess on the CPU; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})


def run_main(*args):
    """dm.main(args) in this process, like run_script but without starting Python and torch again.
    Returns a CompletedProcess-like result (returncode, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            dm.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def benchmark(name):
    """benchmarks/<name>.py as a module, to run its main() in this process (no second start of Python and torch)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_script(*args):
    return subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def wait_for(condition, timeout=300, what="condition"):
    """Poll until condition() is true, with a deadline (no fixed sleeps)."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_one_line_error(result, code, *needles):
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr.lower(), result.stderr
    # what stays on a terminal: a progress bar redraws its line with "\r" and clears it when it closes
    lines = [line.split("\r")[-1] for line in result.stderr.split("\n")]
    err = "\n".join(line for line in lines if line.strip())
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def file_bytes(folder):
    """{name: bytes} of every file in folder, to prove that nothing changed."""
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One real end-to-end run of the script, as a user starts it, shared by the tests that need a
    trained output folder (they must not change it): 2 epochs of 3 batches of 32 digits."""
    out = str(tmp_path_factory.mktemp("smoke"))
    result = run_script("--epochs=2", "--max_batches=3", "--batch_size=32", f"--data_dir={DATA_DIR}",
                        f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result
