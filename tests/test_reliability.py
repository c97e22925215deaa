"""Issue 4: full-state resume, safe interruption, atomic writes, safe loading, NaN, input validation."""
import os
import pickle
import signal

import pytest
import torch

from conftest import (DATA_DIR, assert_one_line_error, dm, file_bytes, run_main, start_script, wait_for)

# small, fast runs: 3 epochs of 20 batches of 32 images
SMALL = ["--epochs=3", "--max_batches=20", "--batch_size=32", "--sample_every=1", f"--data_dir={DATA_DIR}"]


def _weights(out):
    ckpt = torch.load(os.path.join(out, "last.ckpt"), weights_only=True)
    return {f"{net}.{k}": v for net in ("G", "D", "G_ema") for k, v in ckpt[net].items()}, ckpt


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    result = run_main(*SMALL, f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_resume_after_2_epochs_reaches_the_same_weights_as_3_straight(straight_run, tmp_path):
    out = str(tmp_path / "resumed")
    first = run_main(*SMALL, "--epochs=2", f"--output_dir={out}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_main(*SMALL, "--resume=True", f"--output_dir={out}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming from {os.path.join(out, 'last.ckpt')} at epoch 3" in second.stdout
    resumed, ckpt = _weights(out)
    straight, straight_ckpt = _weights(straight_run)
    _assert_same_weights(resumed, straight)
    assert ckpt["state"]["history"]["g_loss"] == straight_ckpt["state"]["history"]["g_loss"]
    for name in ("G_model.ckpt", "D_model.ckpt"):  # the selected checkpoints agree too
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(straight_run, name), "rb").read()


def _interrupt_in_epoch_2(out, signum, extra=()):
    """Start a run, wait until epoch 1 is saved, send `signum`; returns (process, stdout, stderr)."""
    proc = start_script(*SMALL, f"--output_dir={out}", *extra)
    wait_for(lambda: os.path.exists(os.path.join(out, "last.ckpt")) or proc.poll() is not None,
             timeout=300, what="last.ckpt of epoch 1")
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    return proc, stdout, stderr


def test_ctrl_c_mid_epoch_saves_state_and_resume_matches_the_straight_run(straight_run, tmp_path):
    out = str(tmp_path / "interrupted")
    proc, stdout, stderr = _interrupt_in_epoch_2(out, signal.SIGINT)
    assert proc.returncode == 130, stderr[-3000:]
    assert "--resume=True" in stdout and "Traceback" not in stderr
    state = torch.load(os.path.join(out, "last.ckpt"), weights_only=True)["state"]
    assert state["epoch"] == 2 and 0 < state["next_batch"] < 20, state["next_batch"]  # mid-epoch
    resumed = run_main(*SMALL, "--resume=True", f"--output_dir={out}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch 2, batch {state['next_batch']}" in resumed.stdout
    _assert_same_weights(_weights(out)[0], _weights(straight_run)[0])


def test_sigterm_saves_state_and_exits_143(tmp_path):
    out = str(tmp_path / "terminated")
    proc, stdout, stderr = _interrupt_in_epoch_2(out, signal.SIGTERM)
    assert proc.returncode == 143, stderr[-3000:]
    assert "--resume=True" in stdout
    assert torch.load(os.path.join(out, "last.ckpt"), weights_only=True)["state"]["epoch"] == 2


def test_second_ctrl_c_quits_at_once_without_touching_files(tmp_path):
    out = str(tmp_path / "twice")
    # big batches: the first Ctrl-C waits for the end of a batch, the second must not
    proc = start_script(*SMALL, "--batch_size=1024", "--max_batches=3", f"--output_dir={out}")
    wait_for(lambda: os.path.exists(os.path.join(out, "last.ckpt")) or proc.poll() is not None,
             timeout=300, what="last.ckpt of epoch 1")
    before = file_bytes(out)
    proc.send_signal(signal.SIGINT)
    line = ""
    while "Stopping after this batch" not in line:  # the first signal was handled
        line = proc.stderr.readline()
        assert line, "the process ended without reporting the first Ctrl-C"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=300)
    assert proc.returncode == 130
    after = file_bytes(out)
    assert {k: v for k, v in after.items() if ".tmp" not in k} == before  # a .tmp file may be left, no more


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "G_model.ckpt")
    torch.save({"w": torch.ones(3)}, path)
    before = open(path, "rb").read()

    def crash_mid_write(tmp):
        with open(tmp, "wb") as f:
            f.write(before[:10])  # a truncated file...
        raise KeyboardInterrupt  # ...and the process dies
    with pytest.raises(KeyboardInterrupt):
        dm.atomic_write(path, crash_mid_write)
    assert open(path, "rb").read() == before
    dm.atomic_write(str(tmp_path / "img.png"), lambda p: dm.save_grid(torch.zeros(4, 1, 28, 28), p))
    assert sorted(os.listdir(tmp_path)) == ["G_model.ckpt", "G_model.tmp.ckpt", "img.png"]


@pytest.fixture
def smoke_out(smoke_run):
    return smoke_run[0]


def _bad_checkpoints(good_folder, folder):
    good = open(os.path.join(good_folder, "G_model.ckpt"), "rb").read()
    files = {"truncated.ckpt": good[: len(good) // 2], "text.ckpt": b"hello, I am not a checkpoint\n"}
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    torch.save(dm.Discriminator().state_dict(), os.path.join(folder, "discriminator.ckpt"))
    torch.save(dm.Generator(64).state_dict(), os.path.join(folder, "noise64.ckpt"))
    return ["truncated.ckpt", "text.ckpt", "discriminator.ckpt", "noise64.ckpt", "missing.ckpt"]


def test_bad_checkpoints_give_one_clear_line_and_exit_1(smoke_out, tmp_path):
    for name in _bad_checkpoints(smoke_out, str(tmp_path)):
        path = str(tmp_path / name)
        for command in ("sample", "evaluate"):
            result = run_main(command, f"--ckpt={path}", f"--output_dir={tmp_path / 'o'}",
                              f"--data_dir={DATA_DIR}")
            assert_one_line_error(result, 1, path)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_loading_never_runs_code_from_a_checkpoint(tmp_path):
    _Exploit.marker = str(tmp_path / "pwned")
    path = str(tmp_path / "evil.ckpt")
    with open(path, "wb") as f:
        pickle.dump({"main.0.weight": _Exploit()}, f)
    torch.save({"x": _Exploit()}, str(tmp_path / "evil2.ckpt"))
    for p in (path, str(tmp_path / "evil2.ckpt")):
        result = run_main("sample", f"--ckpt={p}", f"--output_dir={tmp_path / 'o'}")
        assert_one_line_error(result, 1, p)
    assert not os.path.exists(_Exploit.marker)


def test_resume_problems_exit_2(smoke_out, tmp_path):
    result = run_main("--resume=True", f"--output_dir={tmp_path / 'empty'}", f"--data_dir={DATA_DIR}")
    assert_one_line_error(result, 2, "last.ckpt")
    before = file_bytes(smoke_out)
    result = run_main("--resume", "--noise_dim=64", f"--output_dir={smoke_out}", f"--data_dir={DATA_DIR}")
    assert_one_line_error(result, 2, "noise_dim", "100", "64")
    assert file_bytes(smoke_out) == before


def test_nan_weights_stop_with_exit_3_and_keep_the_good_checkpoints(smoke_out, tmp_path):
    out = str(tmp_path / "nan")
    os.makedirs(out)
    for name, data in file_bytes(smoke_out).items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    ckpt = torch.load(os.path.join(out, "last.ckpt"), weights_only=True)
    ckpt["D"]["main.0.weight"][0, 0, 0, 0] = float("nan")  # one poisoned weight
    torch.save(ckpt, os.path.join(out, "last.ckpt"))
    before = file_bytes(out)
    result = run_main("--resume", "--epochs=3", "--max_batches=3", "--batch_size=32", f"--output_dir={out}",
                      f"--data_dir={DATA_DIR}")
    assert result.returncode == 3, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and "nan" in last_line.lower() and last_line.startswith("error:")
    assert file_bytes(out) == before  # last.ckpt, G_model.ckpt, D_model.ckpt, pictures: untouched


@pytest.mark.parametrize("arg, needle", [
    ("--batch_size=0", "--batch_size"), ("--lr_d=-1", "--lr_d"), ("--lr_g=0", "--lr_g"),
    ("--lr_d=nan", "--lr_d"), ("--epochs=0", "--epochs"), ("--early_stopping=0", "--early_stopping"),
    ("--noise_dim=0", "--noise_dim"), ("--device=tpu", "--device"), ("--betas=(0.5,1.5)", "--betas"),
    ("--select_by=loss", "--select_by"), ("--max_minutes=-1", "--max_minutes"),
    ("--ema_decay=1", "--ema_decay"), ("--eval_samples=10", "--eval_samples"),
])
def test_bad_hyperparameters_exit_2_before_loading_data(arg, needle, tmp_path, capsys):
    # data_dir does not exist: a check that ran after data loading would exit 1 instead
    with pytest.raises(SystemExit) as e:
        dm.main([arg, f"--data_dir={tmp_path / 'nowhere'}", f"--output_dir={tmp_path / 'o'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_cuda_requested_without_cuda_exits_2(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has CUDA
    result = run_main("--device=cuda", f"--output_dir={tmp_path / 'o'}", f"--data_dir={tmp_path / 'nowhere'}")
    assert_one_line_error(result, 2, "CUDA")


def test_unwritable_output_folder_exits_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("I am a file, not a folder")
    result = run_main(f"--output_dir={blocker / 'outputs'}", f"--data_dir={tmp_path / 'nowhere'}")
    assert_one_line_error(result, 2, str(blocker / "outputs"))
