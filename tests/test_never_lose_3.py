"""Never lose a run, part 3: the real MNIST never overwritten, one judge for all data, resumes that follow
this machine and the saved position, bounded memory for large sets, patience in epochs, real_vs_fake."""
import os
import shutil
import signal

import numpy as np
import torch
import torchvision

from conftest import DATA_DIR, NARROW, assert_one_line_error, config, dm, file_bytes, run_main

CPU = torch.device("cpu")
REAL_RAW = os.path.join(DATA_DIR, "MNIST", "raw")
SMALL = ["--max_batches=10", "--batch_size=16", f"--data_dir={DATA_DIR}", *NARROW]


def _mnist_folder(folder, files):
    """folder/MNIST/raw/ with copies of the given real MNIST files; returns the raw folder."""
    raw = os.path.join(folder, "MNIST", "raw")
    os.makedirs(raw)
    for name in files:
        shutil.copy(os.path.join(REAL_RAW, name), raw)
    return raw


def _dataset(folder, ckpt, *extra, data_dir=DATA_DIR, cache_dir=None):
    return run_main("dataset", "--n=30", "--n_test=10", f"--dataset_dir={folder}", f"--data_dir={data_dir}",
                    f"--ckpt={ckpt}", *([f"--cache_dir={cache_dir}"] if cache_dir else []),
                    f"--output_dir={os.path.join(folder, '..', 'o')}", *extra)


def test_dataset_never_writes_into_the_folder_it_reads_mnist_from(tmp_path, smoke_run):
    raw = _mnist_folder(tmp_path / "D", ["t10k-labels-idx1-ubyte", "train-labels-idx1-ubyte"])
    before = file_bytes(raw)
    for extra in ((), ("--overwrite=True",)):  # not even with --overwrite
        result = _dataset(str(tmp_path / "D"), f"{smoke_run[0]}/G_model.ckpt", *extra, data_dir=str(tmp_path / "D"))
        assert_one_line_error(result, 2, "--dataset_dir", "--data_dir")
    assert file_bytes(raw) == before


def test_dataset_replaces_only_files_it_wrote_itself_unless_overwrite(tmp_path, smoke_run, reader_cache):
    folder, ckpt = str(tmp_path / "D"), f"{smoke_run[0]}/G_model.ckpt"
    raw = _mnist_folder(folder, ["train-labels-idx1-ubyte"])  # one real MNIST file, e.g. a copy of the real set
    before = file_bytes(raw)
    result = _dataset(folder, ckpt, cache_dir=reader_cache)
    assert_one_line_error(result, 2, "train-labels-idx1-ubyte", "--overwrite=True")
    assert file_bytes(raw) == before  # refused before any work: nothing written
    # with --overwrite=True it is replaced; from then on the folder's files are the set's own
    assert _dataset(folder, ckpt, "--overwrite=True", cache_dir=reader_cache).returncode == 0
    assert len(torchvision.datasets.MNIST(folder, train=True).targets) == 30
    again = _dataset(folder, ckpt, "--n_test=20", cache_dir=reader_cache)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(torchvision.datasets.MNIST(folder, train=False).targets) == 20
    # a file changed since (the real test labels copied over it) is foreign again
    shutil.copy(os.path.join(REAL_RAW, "t10k-labels-idx1-ubyte"), raw)
    assert_one_line_error(_dataset(folder, ckpt, cache_dir=reader_cache), 2, "t10k-labels-idx1-ubyte")


def test_two_dataset_runs_into_one_folder_the_second_exits_2(tmp_path, smoke_run):
    folder = str(tmp_path / "D")
    os.makedirs(folder)
    with dm.output_folder_lock(folder, "dataset", "dataset_dir"):  # a first dataset run holds the folder
        result = _dataset(folder, f"{smoke_run[0]}/G_model.ckpt")
    assert_one_line_error(result, 2, folder, f"pid {os.getpid()}", "--dataset_dir")
    assert os.listdir(folder) == []


def test_a_fake_set_as_data_dir_is_scored_by_the_same_judge_against_its_own_test_digits(judge, mnist, tmp_path):
    """A data folder whose labels are wrong (issue 16's trap: a judge trained on it would read nothing right) and whose
    test digits are other digits: the shipped judge scores it, against that folder's own test digits (its floor),
    and no judge is trained on it."""
    raw = tmp_path / "fake" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    fake = dm.MNIST(mnist.test_images, (mnist.test_labels + 1) % 10,
                    mnist.train_images[:3000], mnist.train_labels[:3000])
    for name, data in zip(dm.RAW_FILES, fake):
        magic = 2051 if data.dim() == 3 else 2049
        (raw / name).write_bytes(dm.idx_header(magic, tuple(data.shape)) + data.to(torch.uint8).numpy().tobytes())
    result = run_main("--epochs=1", "--max_batches=2", "--batch_size=16", "--eval_every=1", "--eval_samples=500",
                      f"--data_dir={tmp_path / 'fake'}", f"--output_dir={tmp_path / 'o'}", "--device=cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Shipped judge: judges/judge_lenet_v2.pt" in result.stdout and "Training" not in result.stdout
    floor = float(result.stdout.split("(real data: ")[1].split(")")[0])
    own, real = (dm.reference_stats(judge, m, CPU)[1]["fid"] for m in (dm.load_mnist(str(tmp_path / "fake")), mnist))
    assert floor == round(own, 2) and abs(own - real) > 0.05  # its own test digits, not MNIST's


def test_the_readers_cache_is_keyed_by_their_training_data(reader_cache, mnist, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    shutil.copytree(reader_cache, cache)
    real_reader = dm.get_reader(cache, mnist, CPU, "mlp")
    fake = dm.MNIST(mnist.test_images, (mnist.test_labels + 1) % 10, mnist.test_images, mnist.test_labels)
    trained = []
    real_train = dm.train_reader
    monkeypatch.setattr(dm, "train_reader", lambda name, x, y, device, **k: trained.append(len(x)) or real_train(
        name, x[:2000], y[:2000], device, epochs=1))
    fake_reader = dm.get_reader(cache, fake, CPU, "mlp")  # other training data: a reader of its own, trained now
    assert trained == [10000] and dm.reader_path(cache, fake, "mlp") != dm.reader_path(cache, mnist, "mlp")
    assert len([f for f in os.listdir(cache) if f.startswith(dm.CLASSIFIERS["mlp"].file)]) == 2
    # the real data still gets its own reader, not the one trained on wrong labels
    again = dm.get_reader(cache, mnist, CPU, "mlp")
    assert trained == [10000]
    for a, b in zip(again.parameters(), real_reader.parameters()):
        assert torch.equal(a, b)
    assert dm.judge_accuracy(again, mnist.test_images, mnist.test_labels, CPU) > 0.85
    assert dm.judge_accuracy(fake_reader, mnist.test_images, mnist.test_labels, CPU) < 0.5


def _copy_run(smoke_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(smoke_run[0], out)
    return out


def test_a_cuda_run_resumes_on_a_machine_without_cuda(smoke_run, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = _copy_run(smoke_run, tmp_path)
    ckpt = torch.load(os.path.join(out, "last.ckpt"), weights_only=True)
    ckpt["config"]["device"] = "cuda"  # as saved by a run with --device=cuda
    torch.save(ckpt, os.path.join(out, "last.ckpt"))
    result = run_main("--resume=True", "--epochs=3", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device: 'cuda' is not available on this machine; resuming with --device=auto" in result.stdout
    assert "Epoch [3/3]" in result.stdout
    # --device given now wins; a device this machine lacks is the one-line error of a new run
    assert_one_line_error(run_main("--resume=True", "--epochs=4", "--device=cuda", f"--output_dir={out}"),
                          2, "--device=cuda", "CUDA")
    result = run_main("--resume=True", "--epochs=4", "--device=cpu", f"--output_dir={out}")
    assert result.returncode == 0 and "not available" not in result.stdout and "Epoch [4/4]" in result.stdout


def _interrupted_run(out, monkeypatch, at_call):
    """A run interrupted by Ctrl-C after its at_call-th batch (the signal handler's flag, set by hand)."""
    calls = iter(range(1, 10 ** 6))
    real_G_train = dm.G_train

    def G_train(*args, **kwargs):
        loss = real_G_train(*args, **kwargs)
        if next(calls) == at_call:
            dm.STOP["signal"] = signal.SIGINT
        return loss
    monkeypatch.setattr(dm, "G_train", G_train)
    result = run_main(*SMALL, "--epochs=3", "--g_steps=1", f"--output_dir={out}")  # 1 G_train call per batch
    monkeypatch.setattr(dm, "G_train", real_G_train)
    assert result.returncode == 130, result.stderr[-3000:]
    return torch.load(os.path.join(out, "last.ckpt"), weights_only=True)["state"]


def test_a_resumed_position_past_the_new_epoch_length_ends_that_epoch_and_trains_on(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    state = _interrupted_run(out, monkeypatch, at_call=18)  # epoch 2, batch 8 of 10
    assert (state["epoch"], state["next_batch"]) == (2, 8)
    result = run_main("--resume=True", "--max_batches=5", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 8 of epoch 2, is past this run's 5 batches per epoch" in result.stdout
    assert "Epoch [2/3]" in result.stdout and "Epoch [3/3]" in result.stdout
    saved = torch.load(os.path.join(out, "last.ckpt"), weights_only=True)["state"]
    assert saved["epoch"] == 4 and saved["step"] == 10 + 8 + 5  # epoch 3 trained its 5 batches
    assert saved["history"]["epoch"] == [1, 2, 3]
    # a run that has trained all its epochs says so instead of a silent "Done"
    result = run_main("--resume=True", f"--output_dir={out}")
    assert result.returncode == 0 and "Nothing to train" in result.stdout and "--epochs" in result.stdout


def test_the_resume_hint_has_one_resume_and_quotes_what_the_shell_needs():
    argv = ["dcgan_mnist.py", "--resume=True", "--epochs=3", "--betas=(0.6, 0.99)", "--resume"]
    assert dm.resume_command(argv) == "python dcgan_mnist.py --epochs=3 '--betas=(0.6, 0.99)' --resume=True"
    argv = ["dcgan_mnist.py", "--resume", "True", "--epochs", "3", "--resume"]  # a value after a space goes too
    assert dm.resume_command(argv) == "python dcgan_mnist.py --epochs 3 --resume=True"


def test_dataset_and_pngs_are_drawn_and_written_a_chunk_at_a_time(tmp_path, monkeypatch, reader_cache):
    conditional = str(tmp_path / "cond")
    assert run_main(*SMALL, "--conditional=True", "--epochs=1", f"--output_dir={conditional}").returncode == 0
    ckpt = f"--ckpt={conditional}/G_model.ckpt"
    sizes, real_generate = [], dm.generate
    monkeypatch.setattr(dm, "generate", lambda G, n, *a, **k: sizes.append(n) or real_generate(G, n, *a, **k))
    monkeypatch.setattr(dm, "CHUNK", 40)
    folder = str(tmp_path / "fake")
    result = run_main("dataset", "--n=100", "--n_test=30", f"--dataset_dir={folder}", ckpt, f"--data_dir={DATA_DIR}",
                      f"--cache_dir={reader_cache}", f"--output_dir={tmp_path / 'o'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sizes == [120, 120, 60, 90]  # 3 draws per kept digit (the judge filter), 40 digits at a time
    ds = torchvision.datasets.MNIST(folder, train=True)
    assert ds.data.shape == (100, 28, 28)
    assert np.bincount(ds.targets.numpy(), minlength=10).tolist() == [10] * 10
    # PNGs: a chunk at a time, the same images as in one piece (on the CPU: on a GPU, cuDNN's kernels, and so the
    # last bits of a pixel, can differ with the batch size)
    sizes.clear()
    result = run_main("sample", "--n=100", f"--png_dir={tmp_path / 'png40'}", ckpt, f"--output_dir={tmp_path / 'o'}",
                      "--device=cpu")
    assert result.returncode == 0 and sizes[1:] == [40, 40, 20]  # sizes[0]: the grid
    monkeypatch.setattr(dm, "CHUNK", 10000)
    assert run_main("sample", "--n=100", f"--png_dir={tmp_path / 'png'}", ckpt, f"--output_dir={tmp_path / 'o'}",
                    "--device=cpu").returncode == 0
    for d in range(10):
        assert file_bytes(tmp_path / "png40" / str(d)) == file_bytes(tmp_path / "png" / str(d))


def test_patience_is_counted_in_epochs_when_fid_is_measured_every_2(tmp_path, reader_cache, monkeypatch, capsys):
    fids = iter([5.0, 6.0, 6.0, 6.0, 6.0, 6.0])  # measured at epochs 2, 4, 6, 8, ...; best at epoch 2
    real_quality = dm.quality
    monkeypatch.setattr(dm, "quality", lambda *a, **k: {**real_quality(*a, **k), "fid": next(fids)})
    history = dm.train(config(epochs=20, early_stopping=5, eval_every=2, eval_samples=100, max_batches=1,
                              eval_draws=1, batch_size=16, cache_dir=reader_cache, output_dir=str(tmp_path / "run")),
                       given={"eval_every"})
    # 6 epochs after the best at epoch 2, at the first FID measured: epoch 8 (not 5 evaluations: epoch 12)
    assert history["epoch"] == list(range(1, 9))
    assert "no improvement of fid in 6 epochs" in capsys.readouterr().out


def test_improved_counts_the_epochs_since_the_last_measurement():
    assert dm.improved(6.0, 5.0, 2, epochs_since_last=2) == (False, 5.0, 4)
    assert dm.improved(4.0, 5.0, 4, epochs_since_last=2) == (True, 4.0, 0)


def test_real_vs_fake_shows_the_selected_generator(tmp_path, monkeypatch):
    losses = iter([5.0, 4.0, 3.0, 3.5, 3.2, 3.1])  # best at epoch 3; early stopping after epoch 6
    real_G_train = dm.G_train
    monkeypatch.setattr(dm, "G_train", lambda *a, **k: real_G_train(*a, **k) * 0 + next(losses))
    shown = []
    monkeypatch.setattr(dm, "save_real_vs_fake", lambda real, fake, path: shown.append(fake))
    out = str(tmp_path / "run")
    history = dm.train(config(epochs=20, early_stopping=3, max_batches=1, batch_size=16, select_by="g_loss",
                              g_steps=1, output_dir=out))  # g_steps=1: one scripted loss per batch
    assert history["epoch"] == [1, 2, 3, 4, 5, 6]
    saved = torch.load(os.path.join(out, "last.ckpt"), weights_only=True)
    selected = dm.load_generator(os.path.join(out, "G_model.ckpt"), 100, CPU)
    last = dm.Generator(100)
    last.load_state_dict(saved["G_ema"])
    expected, last_epoch = (dm.draw_fixed(G.eval(), saved["fixed_noise"])[:64] for G in (selected, last))
    torch.testing.assert_close(shown[0], expected)
    assert (shown[0] - last_epoch).abs().mean() > 0.01  # not the last epoch's generator
