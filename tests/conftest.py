"""Shared fixtures. Tests read the real MNIST at $DCGAN_DATA_DIR, else ../shared/data (next to the repo),
else torchvision's default download folder (a user's machine with internet)."""
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


def find_data_dir():
    if os.environ.get("DCGAN_DATA_DIR"):
        return os.environ["DCGAN_DATA_DIR"]
    shared = os.path.join(ROOT, "..", "shared", "data")
    return shared if os.path.isdir(shared) else os.path.join(ROOT, "MNIST")


DATA_DIR = find_data_dir()


@pytest.fixture(scope="session")
def mnist():
    return dm.load_mnist(DATA_DIR)


@pytest.fixture(scope="session")
def judge_cache(tmp_path_factory, mnist):
    """A judge trained once for the whole test session (fixed seed), in its own cache folder."""
    cache = str(tmp_path_factory.mktemp("judge_cache"))
    dm.get_judge(cache, mnist, torch.device("cpu"))
    return cache


@pytest.fixture(scope="session")
def judge(judge_cache, mnist):
    return dm.get_judge(judge_cache, mnist, torch.device("cpu"))


def config(**overrides):
    """The script's defaults, with overrides, as train() takes them."""
    cfg = {name.lower(): getattr(dm, name) for name in dm.CONFIG_NAMES}
    cfg.update(data_dir=DATA_DIR, device="cpu")
    cfg.update(overrides)
    return cfg


def run_script(*args, timeout=600, env=None):
    """Run dcgan_mnist.py in a subprocess on the CPU; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})


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
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr.lower(), result.stderr
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def file_bytes(folder):
    """{name: bytes} of every file in folder, to prove that nothing changed."""
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}
