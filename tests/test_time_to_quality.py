"""Good digits in less time: the learning-rate schedule, the moving average's ramp-up, noise-proof early stopping."""
import os
import signal

import pytest
import torch

from conftest import DATA_DIR, dm, run_main

DECAY = ["--lr_decay_from=0.5", "--lr_end_d=0.25", "--lr_end_g=0.5"]
SMALL = ["--epochs=2", "--max_batches=6", "--batch_size=16", f"--data_dir={DATA_DIR}", *DECAY]


def test_lr_factor_is_flat_then_falls_linearly_to_its_end_value_at_the_last_step():
    factors = [dm.lr_factor(step, 100, 0.5, 0.25) for step in range(100)]
    assert factors[:51] == [1.0] * 51 and factors[-1] == pytest.approx(0.25)
    assert all(a > b for a, b in zip(factors[50:], factors[51:]))  # falls at every step after the start
    assert factors[75] == pytest.approx(1 - 0.75 * 25 / 49)
    assert [dm.lr_factor(s, 100, 1.0, 0.25) for s in (0, 99)] == [1.0, 1.0]  # decay_from 1: constant


def test_a_run_ends_at_the_scheduled_rates_and_resume_continues_the_schedule_exactly(tmp_path, monkeypatch):
    straight = str(tmp_path / "straight")
    assert run_main(*SMALL, f"--output_dir={straight}").returncode == 0
    ckpt = torch.load(os.path.join(straight, "last.ckpt"), weights_only=True)
    # the rates of the last step (step 11 of 12): lr x end
    assert ckpt["D_optimizer"]["param_groups"][0]["lr"] == pytest.approx(8e-4 * 0.25)
    assert ckpt["G_optimizer"]["param_groups"][0]["lr"] == pytest.approx(8e-4 * 0.5)
    # Ctrl-C in the decaying half (after step 9 of 12), then resume: the same weights as the straight run
    calls, real_G_train = iter(range(1, 100)), dm.G_train

    def G_train(*args, **kwargs):
        loss = real_G_train(*args, **kwargs)
        if next(calls) == 9:
            dm.STOP["signal"] = signal.SIGINT
        return loss
    monkeypatch.setattr(dm, "G_train", G_train)
    resumed = str(tmp_path / "resumed")
    assert run_main(*SMALL, f"--output_dir={resumed}").returncode == 130
    monkeypatch.setattr(dm, "G_train", real_G_train)
    assert torch.load(os.path.join(resumed, "last.ckpt"), weights_only=True)["state"]["step"] == 9
    assert run_main("--resume=True", f"--output_dir={resumed}").returncode == 0
    again = torch.load(os.path.join(resumed, "last.ckpt"), weights_only=True)
    for net in ("G", "D", "G_ema"):
        for k, v in ckpt[net].items():
            assert torch.equal(again[net][k], v), (net, k)


def test_ema_rampup_halflife_grows_with_the_steps_up_to_the_decay():
    def one_update(step, rampup, decay=0.998):
        E, G = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(E.weight)
        torch.nn.init.ones_(G.weight)
        dm.ema_update(E, G, decay, step, rampup)
        return 1 - E.weight.item()  # the d of E <- d E + (1 - d) G
    assert one_update(100, 0.05) == pytest.approx(0.5 ** (1 / 5))  # half-life 5% of 100 steps
    assert one_update(2000, 0.05) == pytest.approx(0.5 ** (1 / 100))
    assert one_update(10 ** 6, 0.05) == pytest.approx(0.998)  # capped by the decay
    assert one_update(0, 0.05) == pytest.approx(0.5)  # the first step: half-life of one step
    assert one_update(100, 0.0) == pytest.approx(min(0.998, 101 / 110))  # off: the short warm-up


def test_a_noise_level_dip_is_not_kept_over_later_epochs_within_the_noise():
    """The conditional run that stopped on a dip: FID 4.83 at epoch 5, then 5.00 5.21 5.13 5.02 4.92."""
    best, bad, kept = float("inf"), 0, []
    for epoch, fid in enumerate([9.0, 6.5, 5.6, 5.1, 4.83, 5.00, 5.21, 5.13, 5.02, 4.92, 4.68], start=1):
        keep, best, bad = dm.improved(fid, best, bad, min_delta=0.03)
        kept += [epoch] if keep else []
    assert kept == [1, 2, 3, 4, 5, 10, 11]  # epoch 10 (within 3% of 4.83) replaces the dip; 11 improves
    assert best == 4.68 and bad == 0
    # slow progress in small steps still counts once it adds up to more than the margin
    best, bad = 6.0, 0
    for fid in (5.95, 5.9, 5.8):
        _, best, bad = dm.improved(fid, best, bad, min_delta=0.03)
    assert (best, bad) == (5.8, 0)
