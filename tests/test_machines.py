"""Right on the machines readers have: the precision each gets, the float16 + GradScaler path (run on the CPU,
as on a T4), and what a run says about its machine before it trains."""
import functools
import os
import sys

import pytest
import torch

from conftest import DATA_DIR, NARROW, benchmark, config, dm, run_main

SMALL = ["--epochs=2", "--max_batches=1", "--batch_size=8", f"--data_dir={DATA_DIR}"]  # float16 is slow on CPUs
FLOAT16 = [*SMALL, *NARROW]  # ... the more so at full width


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
    result = run_main(*SMALL, "--epochs=1", f"--output_dir={tmp_path / 'o'}")  # DEVICE = "auto": whatever it picks
    assert result.returncode == 0, result.stderr[-2000:]
    device = dm.pick_device("auto")
    dtype, why = dm.precision(device, True)
    assert result.stdout.splitlines()[0] == f"Device: {device}; {why}"
    if device.type == "cpu":
        assert "bf16" in why if dtype == torch.bfloat16 else "float32: this CPU has no bf16 units" in why
    assert ("GPU defaults:" in result.stdout) == bool(dm.machine_defaults(device.type, dm.capability(device)))


@pytest.mark.parametrize("device_type, capability, wide", [
    ("cuda", (9, 0), True),   # H100/H200: a step costs the same at any width
    ("cuda", (8, 0), True),   # A100
    ("cuda", (7, 5), True),   # T4: float16 tensor cores (a FLOP estimate: ~10 s an epoch)
    ("cuda", (6, 1), False),  # Pascal: no tensor cores
    ("cpu", (0, 0), False),   # every FLOP counts: the narrow defaults
    ("mps", (0, 0), False),   # Apple GPUs: float32, unmeasured
])
def test_each_machine_class_gets_its_defaults(device_type, capability, wide):
    defaults = dm.machine_defaults(device_type, capability)
    assert defaults == (dm.GPU_DEFAULTS if wide else {})
    if wide:
        assert defaults["ngf"] > dm.NGF and defaults["ndf"] > dm.NDF and defaults["epochs"] >= dm.EPOCHS


def test_gpu_defaults_apply_where_the_command_line_is_silent_and_a_wide_run_resumes_on_a_cpu(tmp_path, monkeypatch):
    """A GPU-class machine (here: the CPU, told it is one) trains wide unless told otherwise, and says so; its
    checkpoints then resume, sample and evaluate on a plain CPU with their own widths."""
    out = str(tmp_path / "wide")
    with monkeypatch.context() as m:
        m.setattr(dm, "machine_defaults", lambda device_type, capability=(0, 0): {"ngf": 24, "ndf": 20, "epochs": 2})
        result = run_main(*SMALL[1:], "--epochs=1", "--ndf=12", f"--output_dir={out}")  # --ndf given: it wins
        assert result.returncode == 0, result.stderr[-2000:]
        assert "GPU defaults: ngf=24: on a GPU a wider G and D cost no time (a CPU's: ngf=64" in result.stdout
        assert "Epoch [1/1]" in result.stdout
        saved = torch.load(os.path.join(out, "last.ckpt"), weights_only=True)
        assert (saved["config"]["ngf"], saved["config"]["ndf"]) == (24, 12)
    result = run_main(*SMALL, "--resume", f"--output_dir={out}")  # the CPU: its defaults are the narrow ones
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Epoch [2/2]" in result.stdout and "GPU defaults" not in result.stdout
    again = torch.load(os.path.join(out, "last.ckpt"), weights_only=True)
    assert (again["config"]["ngf"], again["config"]["ndf"]) == (24, 12)
    assert again["G"]["main.0.weight"].shape[1] == 4 * 24
    result = run_main("sample", f"--output_dir={out}", "--device=cpu")  # G_model.ckpt: its width is read from it
    assert result.returncode == 0 and os.path.isfile(os.path.join(out, "fake_grid.png")), result.stderr[-2000:]


def test_cuda_graphs_only_on_cuda_and_never_with_grad_scalers():
    """The training step is recorded as a CUDA graph on CUDA only, where nothing in it reads the GPU from the CPU
    (float16's GradScalers do)."""
    gan = dm.build_models(config(ngf=8, ndf=8), torch.device("cpu"))

    def graphed(device="cuda", gan=gan, **options):
        cfg = config(**{"cuda_graphs": True, **options})
        return not isinstance(dm.training_step(gan, cfg, None, torch.device(device)), functools.partial)
    assert graphed() and not graphed("cpu") and not graphed("mps")
    assert dm.CUDA_GRAPHS and not graphed(cuda_graphs=False)  # on: measured 4.3x faster
    assert not graphed(gan=gan._replace(G_scaler=torch.amp.GradScaler("cpu")))


@pytest.fixture
def float16(monkeypatch):
    """This machine as a T4 sees it: float16 autocast with GradScalers (torch runs both on the CPU)."""
    monkeypatch.setattr(dm, "precision", lambda device, amp=True: dm.choose_precision("cuda", (7, 5), False, amp))


def test_float16_trains_with_grad_scalers_and_resumes_exactly(float16, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    result = run_main(*FLOAT16, f"--output_dir={straight}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "float16 autocast with a gradient scaler" in result.stdout
    ckpt = torch.load(os.path.join(straight, "last.ckpt"), weights_only=True)
    for name in ("G_scaler", "D_scaler"):  # the scalers' state is saved, so that a resume stays exact
        assert ckpt[name]["scale"] > 0 and ckpt[name]["_growth_tracker"] >= 0
    assert all(torch.isfinite(v).all() for v in ckpt["G"].values())
    assert run_main(*FLOAT16, "--epochs=1", f"--output_dir={resumed}").returncode == 0
    assert run_main(*FLOAT16, "--resume", f"--output_dir={resumed}").returncode == 0
    again = torch.load(os.path.join(resumed, "last.ckpt"), weights_only=True)
    for net in ("G", "D", "G_ema", "G_scaler", "D_scaler"):
        for k, v in ckpt[net].items():
            assert torch.equal(torch.as_tensor(again[net][k]), torch.as_tensor(v)), (net, k)


def test_a_float32_run_resumes_as_float16_with_fresh_scalers(float16, tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    with monkeypatch.context() as m:  # the first epoch on a machine without float16 (no scalers saved)
        m.setattr(dm, "precision", lambda device, amp=True: (None, "float32"))
        assert run_main(*FLOAT16, "--epochs=1", f"--output_dir={out}").returncode == 0
    assert "G_scaler" not in torch.load(os.path.join(out, "last.ckpt"), weights_only=True)
    result = run_main(*FLOAT16, "--resume", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Epoch [2/2]" in result.stdout


def test_the_gpu_check_runs_dry_on_the_cpu(reader_cache, few_tests_dir, tmp_path, monkeypatch, capsys):
    """benchmarks/gpu_check.py is ready for the first GPU lent: its every step runs here, tiny, with --dry, and
    leaves a summary of each. In this process (one Python process is how it runs on a GPU too)."""
    gpu_check = benchmark("gpu_check")
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--dry", f"--data_dir={few_tests_dir}",
                                      f"--cache_dir={reader_cache}", f"--out={tmp_path}"])
    with pytest.raises(SystemExit) as exit_code:
        gpu_check.main()
    result = capsys.readouterr()
    assert exit_code.value.code == 0, (result.out[-3000:], result.err[-3000:])
    out = result.out
    assert "float32: this CPU has no bf16 units" in out or "bf16 autocast" in out
    assert "G64 D32 CUDA graphs" in out and "GFLOP/s" in out  # step costs
    assert "the default run, seed 0:" in out and "epoch  seconds  FID" in out and "Epoch [2/2]" in out
    assert out.count("images vs the 1,000 test digits") == 2  # few_tests_dir: the default run, conditional G
    assert "Wrote 300 training and 100 test digits" in out and "dataset:" in out
    assert "gpu_check done" in out and "failed" not in out
    summary = open(tmp_path / "summary.md").read()
    for step in ("1. precision", "2. step_cost.py", "3. the default run", "4. the conditional default", "5. the test"):
        assert f"## {step}" in summary, step
    assert "the default run, seed 0:" in summary and "GFLOP/s" in summary
