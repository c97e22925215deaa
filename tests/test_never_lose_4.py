"""Never lose a run, part 4: a last.ckpt that lacks a part, Ctrl-C in `dataset`, quiet logs, metrics.csv,
"--name value", and what a run says before it happens."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torchvision

from conftest import (DATA_DIR, NARROW, SCRIPT, assert_one_line_error, config, dm, run_main, wait_for)

SMALL = ["--max_batches=4", "--batch_size=16", f"--data_dir={DATA_DIR}", *NARROW]


@pytest.mark.parametrize("part", dm.TRAINING_STATE_PARTS)
def test_a_last_ckpt_without_one_of_its_parts_resumes_with_one_line(part, smoke_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(smoke_run[0], out)
    saved = torch.load(os.path.join(out, "last.ckpt"), weights_only=True)
    del saved[part]  # as written by another version of the script, or edited
    torch.save(saved, os.path.join(out, "last.ckpt"))
    result = run_main("--resume=True", "--epochs=3", f"--output_dir={out}")
    assert_one_line_error(result, 1, "last.ckpt", part, "--output_dir")


def test_a_last_ckpt_whose_weights_do_not_fit_resumes_with_one_line(smoke_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(smoke_run[0], out)
    saved = torch.load(os.path.join(out, "last.ckpt"), weights_only=True)
    saved["D"]["main.0.weight"] = torch.zeros(16, 1, 4, 4)  # another width
    torch.save(saved, os.path.join(out, "last.ckpt"))
    assert_one_line_error(run_main("--resume=True", "--epochs=3", f"--output_dir={out}"), 1, "its D does not fit")


def _start_dataset(folder, ckpt, cache):
    """`dataset` in a subprocess, with SIGINT at its default disposition, as a terminal delivers it."""
    args = ["dataset", "--n", "3000", "--n_test=100", "--measure=500", f"--dataset_dir={folder}", f"--ckpt={ckpt}",
            f"--data_dir={DATA_DIR}", f"--cache_dir={cache}", f"--output_dir={folder}_o"]
    return subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)), args


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_dataset_stops_cleanly_on_a_signal_and_the_same_command_finishes(signum, smoke_run, reader_cache, tmp_path):
    folder = str(tmp_path / "fake")
    raw = os.path.join(folder, "MNIST", "raw")
    proc, args = _start_dataset(folder, f"{smoke_run[0]}/G_model.ckpt", reader_cache)
    tmp_file = os.path.join(raw, "train-images-idx3-ubyte.tmp")
    wait_for(lambda: os.path.exists(tmp_file) or proc.poll() is not None, timeout=120, what="the images' .tmp")
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    assert_one_line_error(result, 128 + signum, "Interrupted", "same command")
    left = os.listdir(raw)
    assert not [f for f in left if ".tmp" in f], left
    written = json.load(open(os.path.join(raw, dm.MANIFEST)))["files"] if dm.MANIFEST in left else {}
    for name in set(left) & set(dm.RAW_FILES):  # a file under a real name is whole, and recorded as ours
        assert written[name] == dm.file_sha256(os.path.join(raw, name)), name
    if signum == signal.SIGTERM:
        return  # the same command then completes: checked once
    again = run_main(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(torchvision.datasets.MNIST(folder, train=True).targets) == 3000
    assert sorted(os.listdir(raw)) == sorted([*dm.RAW_FILES, dm.MANIFEST])


def test_a_piped_log_has_no_progress_bars(smoke_run):
    result = smoke_run[1]
    assert "\r" not in result.stderr and "\r" not in result.stdout
    assert "Epoch [2/2]" in result.stdout  # the epoch lines stay


def _metrics(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_metrics_csv_has_one_row_per_epoch_across_an_interrupted_and_resumed_run(tmp_path, monkeypatch):
    straight = str(tmp_path / "straight")
    assert run_main(*SMALL, "--epochs", "3", "--output_dir", straight).returncode == 0  # "--name value" too
    rows = _metrics(straight)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0]) == list(dm.METRICS_COLUMNS)
    assert all(float(r["seconds"]) > 0 and r["fid"] == "" for r in rows)  # smoke runs skip FID: blank
    # interrupted in epoch 2 (after its first batches: the flag Ctrl-C sets), then resumed
    out = str(tmp_path / "resumed")
    calls, real_G_train = iter(range(1, 10 ** 6)), dm.G_train

    def G_train(*args, **kwargs):
        loss = real_G_train(*args, **kwargs)
        if next(calls) == 2 * 4 * 2 - 3:  # 2 G steps a batch, 4 batches an epoch: in epoch 2, batch 3
            dm.STOP["signal"] = signal.SIGINT
        return loss
    monkeypatch.setattr(dm, "G_train", G_train)
    assert run_main(*SMALL, "--epochs=3", f"--output_dir={out}").returncode == 130
    assert [r["epoch"] for r in _metrics(out)] == ["1"]
    monkeypatch.setattr(dm, "G_train", real_G_train)
    assert run_main(*SMALL, "--epochs=3", "--resume", f"--output_dir={out}").returncode == 0
    resumed = _metrics(out)
    assert [r["epoch"] for r in resumed] == ["1", "2", "3"]
    for a, b in zip(resumed, rows):  # the resumed run is exact: the same figures as the straight one
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_every_option_of_every_command_takes_its_value_after_a_space_too():
    for command, extra in dm.COMMAND_OPTIONS.items():
        cfg = {name.lower(): getattr(dm, name) for name in dm.CONFIG_NAMES}
        values = {**{k: repr(v) if isinstance(v, tuple) else str(v) for k, v in cfg.items()},
                  **{k: str(max(3, spec[0][1])) if isinstance(spec[0], tuple) else ("True" if spec[0] is False else "x")
                     for k, spec in extra.items()}}
        for name, text in values.items():
            assert dm.parse_args([f"--{name}", text], extra, command) == dm.parse_args([f"--{name}={text}"], extra,
                                                                                      command), name
    # a bare switch stays a switch when the next word is another option
    cfg, given, _ = dm.parse_args(["--resume", "--epochs", "5"])
    assert cfg["resume"] is True and cfg["epochs"] == 5 and given == {"resume", "epochs"}
    assert_one_line_error(run_main("--epochs"), 2, "--epochs: expected one argument")


def test_the_run_says_how_long_it_will_take_and_that_a_budget_is_shorter_than_one_epoch(tmp_path):
    out = str(tmp_path / "o")
    result = run_main("--max_batches=40", "--batch_size=8", "--epochs=3", "--max_minutes=0.001", *NARROW,
                      f"--data_dir={DATA_DIR}", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    speed = next(i for i, line in enumerate(lines) if line.startswith("Speed:"))
    assert "an epoch (40 batches) takes about" in lines[speed] and "ends before this epoch does" in lines[speed]
    assert speed < next(i for i, line in enumerate(lines) if line.startswith("Epoch [1/3]"))
    assert "Epoch [2/3]" not in result.stdout and "Stopped: the next epoch would end past" in result.stdout


def test_the_forecast_counts_each_epochs_fid(capsys, judge):
    """On a GPU the FID is a large share of an epoch: the forecast (and what fits MAX_MINUTES) includes it."""
    cfg = {"epochs": 7, "max_minutes": 28.0, "noise_dim": 100, "eval_samples": 200, "eval_draws": 2}
    dm.forecast(0.1, dm.TrainState(), cfg, 600, 0.0, fid=60.0)  # 60 s of batches, then 60 s of FID, an epoch
    out = capsys.readouterr().out
    assert "(600 batches, then 60 s of FID) takes about 2.0 min, 7 epochs about 14.0 min" in out
    dm.forecast(0.0034, dm.TrainState(), dict(cfg, epochs=14), 547, 0.0, fid=0.5)  # a GPU's: seconds, not "0.0 min"
    assert "(547 batches, then 0 s of FID) takes about 2 s, 14 epochs about 33 s" in capsys.readouterr().out
    dm.forecast(0.1, dm.TrainState(), dict(cfg, max_minutes=5.0), 600, 0.0, fid=60.0)
    assert "stops after epoch 2 of 7" in capsys.readouterr().out  # 4 epochs of batches alone would fit
    G = dm.Generator(100).eval()
    judging = dm.Judging(1, "fid", judge, None, None)
    assert dm.fid_seconds(G, cfg, judging, torch.device("cpu")) > 0
    assert dm.fid_seconds(G, cfg, judging._replace(every=0), torch.device("cpu")) == 0  # no FID measured


def test_the_fid_axis_reads_plain_numbers(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(dm.plt, "close", figures.append)
    history = {k: [1.0, 2.0] for k in dm.METRICS_COLUMNS}
    history["fid"] = [40.0, 5.0]
    dm.save_plots(history, 3.6, str(tmp_path / "losses.png"))
    fid_axis = figures[0].axes[1].yaxis
    assert fid_axis.get_major_formatter()(10, 0) == "10" and fid_axis.get_minor_formatter()(40, 0) == "40"
