"""Issue 4: full-state resume, safe interruption, atomic writes, safe loading, NaN, input validation."""
import errno
import os
import pickle
import signal

import pytest
import torch

from conftest import (DATA_DIR, NARROW, assert_one_line_error, dm, file_bytes, run_main, start_script, wait_for)

# small, fast runs: 2 epochs of 20 batches of 32 images
SMALL = ["--epochs=2", "--max_batches=20", "--batch_size=32", "--sample_every=1", f"--data_dir={DATA_DIR}",
         "--device=cpu", *NARROW]  # on the CPU in this process too, like the runs that start_script interrupts


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


def test_resume_after_1_epoch_reaches_the_same_weights_as_2_straight(straight_run, tmp_path):
    out = str(tmp_path / "resumed")
    first = run_main(*SMALL, "--epochs=1", f"--output_dir={out}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_main(*SMALL, "--resume=True", f"--output_dir={out}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming from {os.path.join(out, 'last.ckpt')} at epoch 2" in second.stdout
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
    # big batches of the default widths: the first Ctrl-C waits for the end of a batch, the second must not
    proc = start_script(*SMALL, "--batch_size=256", "--max_batches=1", f"--ngf={dm.NGF}", f"--ndf={dm.NDF}",
                        f"--output_dir={out}")
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


def test_atomic_write_keeps_the_old_file_when_the_process_dies_mid_write(tmp_path, monkeypatch):
    path = str(tmp_path / "G_model.ckpt")
    torch.save({"w": torch.ones(3)}, path)
    before = open(path, "rb").read()

    def die_mid_write(f, data):
        f.write(data[:10])  # a truncated file...
        raise KeyboardInterrupt  # ...and the process dies
    monkeypatch.setattr(dm, "write_chunks", die_mid_write)
    with pytest.raises(KeyboardInterrupt):
        dm.atomic_save({"w": torch.zeros(3)}, path)
    assert open(path, "rb").read() == before
    monkeypatch.undo()
    dm.save_grid(torch.zeros(4, 1, 28, 28), str(tmp_path / "img.png"))
    assert sorted(os.listdir(tmp_path)) == ["G_model.ckpt", "img.png"]  # the temporary file is removed too


def _disk_full_after(monkeypatch, n_writes_ok, failed):
    """From the (n_writes_ok + 1)-th file on, writing stops half-way with ENOSPC, as on a full disk."""
    real = dm.write_chunks
    count = iter(range(10 ** 6))

    def write_chunks(f, data, chunk=1 << 20):
        if next(count) < n_writes_ok:
            return real(f, data, chunk)
        failed.append(f.name)
        f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(dm, "write_chunks", write_chunks)


def test_full_disk_during_training_is_one_line_exit_1_no_debris_old_files_intact(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    assert run_main(*SMALL, "--epochs=1", f"--output_dir={out}").returncode == 0
    before = file_bytes(out)
    failed = []
    _disk_full_after(monkeypatch, 0, failed)  # the very next file: epoch 2's G_model.ckpt
    result = run_main(*SMALL, "--epochs=2", "--resume", f"--output_dir={out}")
    err = assert_one_line_error(result, 1, "No space left on device", "G_model.ckpt")
    assert failed and ".tmp." in failed[0] and err.startswith("error: could not write")
    assert not [n for n in os.listdir(out) if ".tmp." in n]  # the half-written file was removed
    assert file_bytes(out) == before  # every earlier file is as it was (and the lock file is gone)


def test_full_disk_while_writing_pngs_keeps_the_old_png(smoke_out, tmp_path, monkeypatch):
    png_dir = tmp_path / "png"
    png_dir.mkdir()
    (png_dir / "000001.png").write_bytes(b"an older file")
    _disk_full_after(monkeypatch, 2, [])  # fake_grid.png and 000000.png are written, 000001.png fails
    result = run_main("sample", "--n=5", f"--png_dir={png_dir}", f"--ckpt={smoke_out}/G_model.ckpt",
                      f"--output_dir={tmp_path / 'o'}")
    assert_one_line_error(result, 1, "No space left on device", "000001.png")
    assert sorted(os.listdir(png_dir)) == ["000000.png", "000001.png"]
    assert (png_dir / "000001.png").read_bytes() == b"an older file"


def test_resume_applies_and_prints_changed_settings_and_keeps_the_saved_ones(tmp_path):
    out = str(tmp_path / "run")
    assert run_main(*SMALL, "--epochs=1", "--lr_d=4e-4", f"--output_dir={out}").returncode == 0
    # batch size, lr_d and data_dir are not given again: the saved run's values hold, not the defaults
    result = run_main("--resume", "--epochs=2", "--lr_g=1e-4", "--betas=(0.6, 0.99)", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for line in ("epochs: 1 -> 2", f"lr_g: {dm.LR_G!r} -> 0.0001", "betas: (0.5, 0.999) -> (0.6, 0.99)"):
        assert line in lines, result.stdout
    assert not [l for l in lines if l.startswith(("lr_d:", "batch_size:", "data_dir:"))]
    ckpt = torch.load(os.path.join(out, "last.ckpt"), weights_only=True)
    assert ckpt["state"]["epoch"] == 3  # epoch 2 was trained
    config = ckpt["config"]
    assert (config["lr_g"], config["lr_d"], config["betas"]) == (1e-4, 4e-4, (0.6, 0.99))
    assert (config["batch_size"], config["max_batches"], config["data_dir"]) == (32, 20, DATA_DIR)
    # the restored optimizers trained with the new settings (their saved param groups would say 1.6e-3)
    assert [g["lr"] for g in ckpt["G_optimizer"]["param_groups"]] == [1e-4]
    assert [g["lr"] for g in ckpt["D_optimizer"]["param_groups"]] == [4e-4]
    assert [tuple(g["betas"]) for g in ckpt["G_optimizer"]["param_groups"]] == [(0.6, 0.99)]


def test_a_second_run_into_the_same_folder_exits_2_while_the_first_finishes(tmp_path, smoke_out):
    out = str(tmp_path / "shared")
    first = start_script(*SMALL, f"--output_dir={out}")
    lock = os.path.join(out, "train.lock")
    wait_for(lambda: (os.path.exists(lock) and open(lock).read() == str(first.pid)) or first.poll() is not None,
             timeout=120, what="the first run's lock")
    second = run_main(*SMALL, f"--output_dir={out}")
    assert_one_line_error(second, 2, out, f"pid {first.pid}")
    # reading is not blocked
    assert run_main("sample", f"--ckpt={smoke_out}/G_model.ckpt", f"--output_dir={out}").returncode == 0
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert "Epoch [2/2]" in stdout and not os.path.exists(lock)
    assert torch.load(os.path.join(out, "last.ckpt"), weights_only=True)["state"]["epoch"] == 3


def _data_copy(tmp_path, name, data):
    """A data folder with the real MNIST files, except `name`, which holds `data`."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in dm.RAW_FILES:
        if f != name:
            os.symlink(os.path.join(os.path.abspath(DATA_DIR), "MNIST", "raw", f), raw / f)
    (raw / name).write_bytes(data)
    return str(tmp_path / "data"), str(raw / name)


def test_a_truncated_mnist_file_is_named_with_its_expected_size(tmp_path):
    real = open(os.path.join(DATA_DIR, "MNIST", "raw", "train-images-idx3-ubyte"), "rb").read(1_000_000)
    data_dir, path = _data_copy(tmp_path, "train-images-idx3-ubyte", real)
    result = run_main(f"--data_dir={data_dir}", f"--output_dir={tmp_path / 'o'}", "--epochs=1")
    err = assert_one_line_error(result, 1, path, "47,040,016", "1,000,000", "Delete it")
    assert "could not be downloaded" not in err


def test_a_wrong_header_is_named(tmp_path):
    data_dir, path = _data_copy(tmp_path, "t10k-labels-idx1-ubyte", b"<html>not MNIST</html>")
    result = run_main(f"--data_dir={data_dir}", f"--output_dir={tmp_path / 'o'}", "--epochs=1")
    assert_one_line_error(result, 1, path, "header", "2049")


@pytest.mark.parametrize("option", ["png_dir", "output_dir", "cache_dir"])
def test_a_file_given_as_a_folder_exits_2_before_any_work(option, smoke_out, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("I am a file, not a folder")
    folders = {"output_dir": str(tmp_path / "o"), option: str(blocker / "sub") if option == "cache_dir" else str(blocker)}
    args = [f"--{k}={v}" for k, v in folders.items()]
    result = run_main("sample", "--n=10", f"--ckpt={smoke_out}/G_model.ckpt", *args)
    assert_one_line_error(result, 2, f"--{option}=")
    assert blocker.read_text() == "I am a file, not a folder"


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


@pytest.mark.parametrize("name, what", [("D_model.ckpt", "is a discriminator (a D_model.ckpt), not a generator"),
                                        ("last.ckpt", "is a training state (the last.ckpt that --resume reads)")])
def test_a_discriminator_or_a_training_state_given_as_the_generator_is_named(name, what, smoke_out, tmp_path):
    for command in ("sample", "evaluate", "dataset"):
        result = run_main(command, f"--ckpt={smoke_out}/{name}", f"--output_dir={tmp_path / 'o'}",
                          f"--dataset_dir={tmp_path / 'd'}" if command == "dataset" else "--seed=0",
                          f"--data_dir={DATA_DIR}")
        err = assert_one_line_error(result, 1, f"{smoke_out}/{name} {what}", "pass the G_model.ckpt beside it")
        assert err.endswith("beside it")  # a whole sentence, not torch's heading


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
    ("--dataset_filter=1", "--dataset_filter"), ("--dataset_filter=-0.5", "--dataset_filter"),
    ("--dataset_agree=1", "--dataset_agree"), ("--dataset_agree=-0.1", "--dataset_agree"), ("--g_steps=0", "--g_steps"),
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
