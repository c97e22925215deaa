"""Right on the machines readers have: the precision each gets, the float16 + GradScaler path (run on the CPU,
as on a T4), and what a run says about its machine before it trains."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import DATA_DIR, ROOT, dm, run_main

SMALL = ["--epochs=2", "--max_batches=1", "--batch_size=8", f"--data_dir={DATA_DIR}"]  # float16 is slow on CPUs


@pytest.mark.parametrize("device_type, capability, cpu_bf16, expected", [
    ("cuda", (9, 0), False, torch.bfloat16),  # H100/H200
    ("cuda", (8, 0), False, torch.bfloat16),  # A100
    ("cuda", (7, 5), False, torch.float16),   # T4, RTX 20xx: no bf16 units, float16 tensor cores
    ("cuda", (7, 0), False, torch.float16),   # V100
    ("cpu", (0, 0), True, torch.bfloat16),    # AVX512-BF16 / AMX
    ("cpu", (0, 0), False, None),             # AVX2 laptops and cloud VMs: float32
    ("mps", (0, 0), False, None),             # Apple GPUs: float32
])
def test_each_machine_gets_the_precision_its_hardware_computes_natively(device_type, capability, cpu_bf16,
                                                                         expected):
    dtype, why = dm.choose_precision(device_type, capability, cpu_bf16)
    assert dtype == expected and why
    assert dm.choose_precision(device_type, capability, cpu_bf16, amp=False)[0] is None  # --amp=False: float32
    if device_type == "cuda" and capability < (8, 0):
        assert dtype != torch.bfloat16  # never emulated bf16


def test_this_machine_is_told_its_precision_and_why(tmp_path):
    result = run_main(*SMALL, "--epochs=1", f"--output_dir={tmp_path / 'o'}")
    assert result.returncode == 0, result.stderr[-2000:]
    dtype, why = dm.precision(torch.device("cpu"), True)
    assert result.stdout.splitlines()[0] == f"Device: cpu; {why}"
    assert "bf16" in why if dtype == torch.bfloat16 else "float32: this CPU has no bf16 units" in why


@pytest.fixture
def float16(monkeypatch):
    """This machine as a T4 sees it: float16 autocast with GradScalers (torch runs both on the CPU)."""
    monkeypatch.setattr(dm, "precision", lambda device, amp=True: dm.choose_precision("cuda", (7, 5), False, amp))


def test_float16_trains_with_grad_scalers_and_resumes_exactly(float16, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    result = run_main(*SMALL, f"--output_dir={straight}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "float16 autocast with a gradient scaler" in result.stdout
    ckpt = torch.load(os.path.join(straight, "last.ckpt"), weights_only=True)
    for name in ("G_scaler", "D_scaler"):  # the scalers' state is saved, so that a resume stays exact
        assert ckpt[name]["scale"] > 0 and ckpt[name]["_growth_tracker"] >= 0
    assert all(torch.isfinite(v).all() for v in ckpt["G"].values())
    assert run_main(*SMALL, "--epochs=1", f"--output_dir={resumed}").returncode == 0
    assert run_main(*SMALL, "--resume", f"--output_dir={resumed}").returncode == 0
    again = torch.load(os.path.join(resumed, "last.ckpt"), weights_only=True)
    for net in ("G", "D", "G_ema", "G_scaler", "D_scaler"):
        for k, v in ckpt[net].items():
            assert torch.equal(torch.as_tensor(again[net][k]), torch.as_tensor(v)), (net, k)


def test_a_float32_run_resumes_as_float16_with_fresh_scalers(float16, tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    with monkeypatch.context() as m:  # the first epoch on a machine without float16 (no scalers saved)
        m.setattr(dm, "precision", lambda device, amp=True: (None, "float32"))
        assert run_main(*SMALL, "--epochs=1", f"--output_dir={out}").returncode == 0
    assert "G_scaler" not in torch.load(os.path.join(out, "last.ckpt"), weights_only=True)
    result = run_main(*SMALL, "--resume", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Epoch [2/2]" in result.stdout


def test_the_gpu_check_runs_dry_on_the_cpu(judge_cache, tmp_path):
    """benchmarks/gpu_check.py is ready for the first GPU lent: its every step runs here, tiny, with --dry."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry",
                             f"--data_dir={DATA_DIR}", f"--cache_dir={judge_cache}", f"--out={tmp_path}"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    out = result.stdout
    for step in ("== 1. precision", "== 3. bench_train.py", "== 4. step_cost.py", "== 5. the default run"):
        assert step in out, step
    assert "float32: this CPU has no bf16 units" in out or "bf16 autocast" in out
    assert "ratio=" in out and "G64 D32" in out and "GFLOP/s" in out  # the tutorial's loop against ours; step costs
    assert "Epoch [1/1]" in out and "FID:" in out and "gpu_check done" in out and "failed" not in out
    assert os.path.isfile(tmp_path / "metrics.csv")
