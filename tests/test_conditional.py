"""Issue 10: the conditional mode, the held-out setting, the fake MNIST in MNIST's files, train-on-fake."""
import json
import os
import re
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from conftest import DATA_DIR, NARROW, assert_one_line_error, config, dm, run_main

CPU = torch.device("cpu")
SMALL = ["--conditional=True", "--max_batches=5", "--batch_size=32", f"--data_dir={DATA_DIR}", *NARROW]


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """A conditional smoke run, 2 epochs straight (shared; tests must not change it)."""
    out = str(tmp_path_factory.mktemp("conditional"))
    result = run_main(*SMALL, "--epochs=2", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_conditional_G_and_D_depend_on_the_label():
    torch.manual_seed(0)
    G, D = dm.Generator(100, 10).apply(dm.weights_init).eval(), dm.Discriminator(10).apply(dm.weights_init).eval()
    z = torch.randn(4, 100, 1, 1).repeat(2, 1, 1, 1)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    fakes = G(z, y)
    assert fakes.shape == (8, 1, 28, 28)
    # same noise, other digits: other images (at init G's outputs are small, so compare relatively)
    assert (fakes[:4] - fakes[4:]).abs().mean() > 0.02 * fakes.abs().mean()
    x = fakes[:4].repeat(2, 1, 1, 1)
    logits = D(x, y)
    assert logits.shape == (8, 1, 1, 1) and not torch.allclose(logits[:4], logits[4:])
    # an unconditional pair is the tutorial's: the label is not an input at all
    assert dm.Generator(100).main[0].in_channels == 100 and not hasattr(dm.Discriminator(), "embed")


@pytest.mark.parametrize("n", [8, 7])
def test_pair_labels_draws_each_digit_of_the_first_half_twice(n):
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])[:n]
    paired = dm.pair_labels(labels)
    half = n // 2
    assert len(paired) == n and torch.equal(paired[:n - half], labels[:n - half])
    assert torch.equal(paired[:half], paired[n - half:])  # the pairs that G_train pushes apart


def test_mode_seeking_term_pushes_two_digits_of_one_label_apart():
    """G steps on a fixed noise batch, with D frozen at init: the pairs drawn for one label grow further
    apart with the mode-seeking term than without it, and the reported loss stays the adversarial one."""
    distances = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        G, D = dm.Generator(100, 10).apply(dm.weights_init), dm.Discriminator(10).apply(dm.weights_init)
        opt = torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.5, 0.999))
        z, labels = torch.randn(32, 100, 1, 1), dm.pair_labels(torch.arange(32) % 10)
        for _ in range(5):
            fake = G(z, labels)
            loss = dm.G_train(fake, D, opt, labels=labels, mode_seeking=weight)
        with torch.no_grad():
            out = D(fake.detach(), labels)
        # the returned loss is D's BCE on the batch only (comparable between settings)
        torch.testing.assert_close(loss, torch.nn.functional.softplus(-out).mean(), rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            G.eval()
            fake = G(z, labels)
        distances[weight] = (fake[:16] - fake[16:]).abs().mean().item()
    assert distances[1.0] > 1.5 * distances[0.0], distances


def test_merge_test_false_trains_on_the_60000_training_digits_only(mnist):
    for merge, n in ((True, 70000), (False, 60000)):
        data = dm.setup_training(config(merge_test=merge, eval_every=0), (), None, CPU)[0]
        assert len(data.images) == len(data.labels) == n
        assert torch.equal(data.images[:100], mnist.train_images[:100])
        assert torch.equal(data.labels[:100], mnist.train_labels[:100])


def test_conditional_run_resumes_exactly_and_writes_10x10_grids(conditional_run, tmp_path):
    out = str(tmp_path / "resumed")
    assert run_main(*SMALL, "--epochs=1", f"--output_dir={out}").returncode == 0
    result = run_main("--resume", "--epochs=2", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    a = torch.load(os.path.join(out, "last.ckpt"), weights_only=True)
    b = torch.load(os.path.join(conditional_run, "last.ckpt"), weights_only=True)
    for net in ("G", "D", "G_ema"):
        for k in b[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert a["config"]["conditional"] is True
    grid = cv2.imread(os.path.join(conditional_run, "samples_epoch_002.png"))
    assert grid.shape[:2] == (10 * 28 + 11 * 2, 10 * 28 + 11 * 2)  # 10x10, padding 2
    # a resumed run cannot switch the mode
    result = run_main("--resume", "--conditional=False", "--epochs=3", f"--output_dir={out}")
    assert_one_line_error(result, 2, "--conditional")


def test_sample_digit_grid_interpolation_and_imagefolder_pngs(conditional_run, tmp_path):
    ckpt, out = os.path.join(conditional_run, "G_model.ckpt"), str(tmp_path / "o")
    result = run_main("sample", f"--ckpt={ckpt}", f"--output_dir={out}", "--interpolate",
                      "--n=25", f"--png_dir={tmp_path / 'png'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert cv2.imread(os.path.join(out, "fake_grid.png")).shape[:2] == (302, 302)  # 10x10 by digit
    assert cv2.imread(os.path.join(out, "interpolation.png")).shape[:2] == (302, 302)
    folder = torchvision.datasets.ImageFolder(str(tmp_path / "png"))
    assert folder.classes == [str(d) for d in range(10)]
    counts = np.bincount([label for _, label in folder.samples], minlength=10)
    assert counts.tolist() == [3] * 5 + [2] * 5  # 25 digits, balanced
    assert run_main("sample", f"--ckpt={ckpt}", f"--output_dir={out}", "--digit=7").returncode == 0
    assert cv2.imread(os.path.join(out, "fake_grid.png")).shape[:2] == (242, 242)  # 8x8 sevens


def test_slerp_stays_on_the_noise_shell():
    a, b = torch.randn(100, generator=torch.Generator().manual_seed(0)), torch.randn(100)
    b = b / b.norm() * a.norm()
    path = [dm.slerp(a, b, t) for t in torch.linspace(0, 1, 5)]
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b, rtol=1e-4, atol=1e-4)
    assert all(abs(p.norm() - a.norm()) < 1e-3 for p in path)  # a straight line would dip in between


def _read_idx(path):
    data = open(path, "rb").read()
    return int.from_bytes(data[:4], "big"), data


def test_dataset_is_mnist_to_torchvision_and_to_this_script(conditional_run, reader_cache, tmp_path):
    folder = str(tmp_path / "fake_mnist")
    result = run_main("dataset", "--n=50", "--n_test=20", f"--dataset_dir={folder}", f"--data_dir={DATA_DIR}",
                      f"--ckpt={conditional_run}/G_model.ckpt", f"--cache_dir={reader_cache}",
                      f"--output_dir={tmp_path / 'o'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("(labels: the digits G was asked for, kept where the judge reads them "
            "(p >= 0.5) and a ResNet agrees (p >= 0.9), centred like MNIST's)") in result.stdout
    away = re.search(r"Of 210 digits drawn, the judge turned away (\d+) \(\d+%\), the ResNet (\d+)", result.stdout)
    assert away and int(away[1]) + int(away[2]) >= 210 - 70  # 3x drawn, 70 kept: at least 140 turned away
    raw = os.path.join(folder, "MNIST", "raw")
    assert sorted(os.listdir(raw)) == sorted([*dm.RAW_FILES, dm.MANIFEST])  # nothing else, no temporary files
    assert os.listdir(folder) == ["MNIST"]  # the lock is gone
    assert _read_idx(os.path.join(raw, "train-images-idx3-ubyte"))[0] == 2051
    assert _read_idx(os.path.join(raw, "train-labels-idx1-ubyte"))[0] == 2049
    for train, n in ((True, 50), (False, 20)):
        ds = torchvision.datasets.MNIST(folder, train=train, download=False)
        assert ds.data.shape == (n, 28, 28) and ds.data.dtype == torch.uint8
        assert ds.targets.dtype == torch.int64
        assert np.bincount(ds.targets.numpy(), minlength=10).tolist() == [n // 10] * 10  # balanced
        assert ds.data.float().std() > 10  # images, not blanks
    manifest = json.load(open(os.path.join(raw, dm.MANIFEST)))  # what `dataset` measured of the set it wrote
    assert sorted(manifest["files"]) == sorted(dm.RAW_FILES) and manifest["fidelity"]["digits"] == 50
    assert 0 <= manifest["fidelity"]["near_copies"] <= 1 and manifest["fidelity"]["real_recall"] > 0.5
    assert f"Its first 50 training digits: precision {manifest['fidelity']['precision']:.1%}" in result.stdout
    loaded = dm.load_mnist(folder)  # a drop-in for --data_dir
    assert torch.equal(loaded.train_images, torchvision.datasets.MNIST(folder, train=True).data)
    assert len(loaded.test_labels) == 20
    # without the filter, no judge is needed (no MNIST, no cache): every digit drawn is kept; centred or not
    sets = {}
    for center in (True, False):
        sets[center] = str(tmp_path / f"unfiltered_{center}")
        result = run_main("dataset", "--n=50", "--n_test=20", f"--dataset_dir={sets[center]}", "--dataset_filter=0",
                          f"--dataset_center={center}", f"--ckpt={conditional_run}/G_model.ckpt",
                          f"--data_dir={tmp_path / 'no_mnist'}", f"--output_dir={tmp_path / 'o'}")
        assert result.returncode == 0, result.stderr[-3000:]
    assert "the digits G was asked for)" in result.stdout and "not measured: MNIST is not in" in result.stdout
    centred, drawn = (torchvision.datasets.MNIST(sets[c], train=True, download=False) for c in (True, False))
    assert np.bincount(drawn.targets.numpy(), minlength=10).tolist() == [5] * 10
    assert torch.equal(centred.data, dm.center_digits(drawn.data)) and not torch.equal(centred.data, drawn.data)


def _centre_of_mass(digits):
    x, coords = digits.float(), torch.arange(28.0)
    return torch.stack([x.sum(2) @ coords, x.sum(1) @ coords], 1) / x.sum((1, 2))[:, None]


def test_center_digits_moves_a_digit_back_where_mnist_puts_it(mnist):
    real = mnist.test_images[:500]
    assert torch.equal(dm.center_digits(real), real)  # MNIST's own digits are centred already
    assert (_centre_of_mass(real) - 14).abs().max() <= 0.5
    moved = dm.shift_images(real, torch.full((500,), 2), torch.full((500,), -3), 3, 0)  # 2 up, 3 right
    whole = moved.float().sum((1, 2)) == real.float().sum((1, 2))  # nothing pushed out of the frame
    assert whole.float().mean() > 0.9 and torch.equal(dm.center_digits(moved)[whole], real[whole])


def test_judge_filter_keeps_balanced_digits_that_the_judge_reads_as_asked(judge, mnist):
    """Real test digits, a third of them "asked for" the wrong digit: the filter keeps digits the judge
    reads as asked, balanced; when too few of a digit pass, every one that passed is kept and the likeliest
    others fill up."""
    true = mnist.test_labels[:3000]
    wrong = torch.arange(3000) % 3 == 0
    asked = torch.where(wrong, (true + 1) % 10, true)
    probs = dm.judge_outputs(judge, dm.to_float(mnist.test_images[:3000]), CPU)[1]
    passed = torch.from_numpy(probs.argmax(1)) == asked
    keep = dm.judge_filter(probs, asked, 1000, seed=0)  # ~200 of each digit pass, 100 are wanted
    assert len(set(keep.tolist())) == 1000
    assert torch.bincount(asked[keep], minlength=10).tolist() == [100] * 10
    assert passed[keep].all() and wrong[keep].float().mean() < 0.02  # only the judge's own mistakes
    assert not torch.equal(keep.sort().values, dm.judge_filter(probs, asked, 1000, seed=1).sort().values)
    keep = dm.judge_filter(probs, asked, 2500, seed=0)  # 250 of each wanted: more than pass
    assert torch.bincount(asked[keep], minlength=10).tolist() == [250] * 10
    assert set(passed.nonzero().flatten().tolist()) <= set(keep.tolist())
    # a stricter probability: only digits the judge is that sure of pass, the surest others fill up
    p_asked = torch.from_numpy(probs)[torch.arange(3000), asked]
    sure = passed & (p_asked >= 0.999)
    keep = dm.judge_filter(probs, asked, 1000, seed=0, min_p=0.999)
    assert torch.bincount(asked[keep], minlength=10).tolist() == [100] * 10
    for d in range(10):  # per digit: every sure one if too few are sure, else only sure ones
        mine = asked == d
        if sure[mine].sum() >= 100:
            assert sure[keep][asked[keep] == d].all()
        else:
            assert set((sure & mine).nonzero().flatten().tolist()) <= set(keep.tolist())
    assert p_asked[keep].min() > p_asked[dm.judge_filter(probs, asked, 1000, seed=0)].min()


def test_judge_filter_tallies_what_each_builder_turned_away(judge, mnist):
    """dataset's last line counts the digits drawn, those each builder turned away, and those kept short of the
    bar: real digits, a third asked for the wrong digit; a second builder that turns away every 7 asked."""
    asked = torch.where(torch.arange(3000) % 3 == 0, (mnist.test_labels[:3000] + 1) % 10, mnist.test_labels[:3000])
    probs = dm.judge_outputs(judge, dm.to_float(mnist.test_images[:3000]), CPU)[1]
    second = F.one_hot(torch.where(asked == 7, 1, asked), 10).float()
    tally = Counter()
    keep = dm.judge_filter(probs, asked, 1000, 0, 0.5, second, 0.9, tally)
    judge_ok = dm.read_as_asked(probs, asked, 0.5)
    assert tally["drawn"] == 3000 and tally["judge"] == int((~judge_ok).sum()) > 900  # the wrong third, at least
    assert tally["resnet"] == int((asked == 7).sum())
    assert tally["short"] == 100 == int((asked[keep] == 7).sum())  # no 7 passed: the likeliest 100 fill up
    assert "the ResNet" in dm.turned_away(tally) and "did not pass" in dm.turned_away(tally)


def test_second_builder_drops_the_digits_it_does_not_read_as_asked(judge, mnist):
    """Real test digits, each asked for its true label; the second builder (made up
    here) reads the odd-numbered ones as another digit, or as the asked one but unsure: with DATASET_AGREE
    they are dropped first, without it (the judge alone) they stay as often as the others."""
    asked = mnist.test_labels[:3000]
    probs = dm.judge_outputs(judge, dm.to_float(mnist.test_images[:3000]), CPU)[1]
    other, unsure = torch.arange(3000) % 4 == 1, torch.arange(3000) % 4 == 3
    odd = other | unsure
    second = F.one_hot(asked, 10).float() * 0.95 + 0.005                # reads the asked digit, p = 0.955
    second[other] = F.one_hot((asked[other] + 1) % 10, 10).float()      # reads another digit
    second[unsure] = F.one_hot(asked[unsure], 10).float() * 0.5 + 0.05  # reads the asked digit, p = 0.55
    keep = dm.judge_filter(probs, asked, 1000, 0, 0.5, second, 0.9)
    assert torch.bincount(asked[keep], minlength=10).tolist() == [100] * 10
    assert not odd[keep].any()  # only digits both builders read as asked, the ResNet with p >= 0.9
    assert 0.4 < odd[dm.judge_filter(probs, asked, 1000, 0, 0.5)].float().mean() < 0.6
    assert odd[dm.judge_filter(probs, asked, 1000, 0, 0.5, second, 0.4)].any()  # p = 0.55 passes agree 0.4


def test_unconditional_dataset_is_labeled_by_the_judge(smoke_run, judge, reader_cache, tmp_path):
    folder = str(tmp_path / "fake_mnist")
    result = run_main("dataset", "--n=200", "--n_test=10", "--measure=0", f"--dataset_dir={folder}",
                      f"--data_dir={DATA_DIR}", f"--ckpt={smoke_run[0]}/G_model.ckpt", f"--cache_dir={reader_cache}",
                      f"--output_dir={tmp_path / 'o'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "judge" in result.stdout and "precision" not in result.stdout  # --measure=0: not measured
    assert "fidelity" not in json.load(open(os.path.join(folder, "MNIST", "raw", dm.MANIFEST)))
    result = run_main("dataset", "--n=3", "--n_test=1", f"--dataset_dir={tmp_path / 'three'}", f"--data_dir={DATA_DIR}",
                      f"--ckpt={smoke_run[0]}/G_model.ckpt", f"--cache_dir={reader_cache}",
                      f"--output_dir={tmp_path / 'o'}")
    assert result.returncode == 0 and "not measured: they need more than 3 digits" in result.stdout
    ds = torchvision.datasets.MNIST(folder, train=True, download=False)
    with torch.no_grad():
        read = judge(dm.to_float(ds.data)).argmax(1)
    assert (read == ds.targets).float().mean() > 0.95  # the judge's reading (pixels were rounded since)


@pytest.mark.parametrize("args, code, needle", [
    (["sample", "--digit=10"], 2, "--digit"),
    (["sample", "--digit=-1"], 2, "--digit"),
    (["sample", "--digit=seven"], 2, "--digit"),
    (["dataset", "--n=100"], 2, "--dataset_dir"),
    (["dataset", "--n=0", "--dataset_dir=x"], 2, "--n"),
    (["dataset", "--n=ten", "--dataset_dir=x"], 2, "--n"),
    (["dataset", "--n_test=0", "--dataset_dir=x"], 2, "--n_test"),
    (["sample", "--interpolate=maybe"], 2, "--interpolate"),
])
def test_command_option_errors_are_one_line(args, code, needle, tmp_path):
    result = run_main(*args, f"--output_dir={tmp_path / 'o'}")
    assert_one_line_error(result, code, needle)


def test_digit_with_an_unconditional_checkpoint_and_dataset_dir_that_is_a_file(smoke_run, tmp_path):
    ckpt = f"--ckpt={smoke_run[0]}/G_model.ckpt"
    result = run_main("sample", "--digit=3", ckpt, f"--output_dir={tmp_path / 'o'}")
    assert_one_line_error(result, 2, "--digit", "unconditional")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_main("dataset", f"--dataset_dir={blocker}", ckpt, f"--output_dir={tmp_path / 'o'}")
    assert_one_line_error(result, 2, "--dataset_dir")


def _train_on_fake(images, labels, mnist, reader="judge"):
    """Train on synthetic, test on real: classifier `reader` trained its own way on these digits, its accuracy on
    mnist's test digits (what report_train_on_fake does for each reader)."""
    return dm.judge_accuracy(dm.train_reader(reader, images, labels, CPU), mnist.test_images, mnist.test_labels, CPU)


def test_train_on_fake_routine_measures_real_digits(mnist):
    """Fed real labeled digits it gives a judge-like accuracy; fed wrong labels, chance."""
    few_tests = mnist._replace(test_images=mnist.test_images[:2000], test_labels=mnist.test_labels[:2000])
    accuracy = _train_on_fake(mnist.train_images[:4000], mnist.train_labels[:4000], few_tests)
    assert accuracy > 0.93  # 4,000 digits (a fifteenth of MNIST); all 60,000 give the judge itself, 99.1%
    shuffled = mnist.train_labels[:1000][torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    assert _train_on_fake(mnist.train_images[:1000], shuffled, few_tests) < 0.3


@pytest.mark.parametrize("reader", dm.READERS)
def test_each_outside_reader_learns_real_digits_and_not_wrong_labels(mnist, reader_cache, reader):
    """train_reader on 4,000 real digits (the copy reader_cache trained) reads the test digits; fed shuffled
    labels, it is at chance. All 60,000 digits: allconv 99.2-99.3%, mlp 98.2%, vgg 99.4%."""
    trained = dm.get_reader(reader_cache, mnist, CPU, reader)
    assert dm.judge_accuracy(trained, mnist.test_images[:2000], mnist.test_labels[:2000], CPU) > 0.85
    shuffled = mnist.train_labels[:500][torch.randperm(500, generator=torch.Generator().manual_seed(0))]
    few_tests = mnist._replace(test_images=mnist.test_images[:2000], test_labels=mnist.test_labels[:2000])
    assert _train_on_fake(mnist.train_images[:500], shuffled, few_tests, reader) < 0.3


def test_random_shift_moves_each_digit_by_its_own_offset_and_keeps_it_whole(mnist):
    x = dm.to_float(mnist.test_images[:400])
    inner = torch.zeros(28, 28, dtype=torch.bool)
    inner[2:-2, 2:-2] = True
    x = x[(x[:, 0][:, ~inner] == -1).all(1)][:256]  # digits with no ink in their outer 2 pixels (nearly all)
    torch.manual_seed(0)
    moved = dm.random_shift(x, 2)
    assert moved.shape == x.shape and moved.min() == -1
    assert torch.allclose((moved + 1).sum((1, 2, 3)), (x + 1).sum((1, 2, 3)))  # no ink lost
    offsets = set()
    for a, b in zip(x, moved):  # each image is the original moved by one offset within 2 pixels
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(torch.roll(a, (dy, dx), (1, 2)), b)]
        assert found
        offsets.add(found[0])
    assert len(offsets) == 25  # all offsets, drawn per image


def test_training_a_cached_classifier_says_how_long_it_takes(mnist, tmp_path, capsys):
    """Before the once-only training of a reader on real digits is far along, one line says roughly how long it
    takes on this machine (timed over its first 20 batches)."""
    few = mnist._replace(train_images=mnist.train_images[:2600], train_labels=mnist.train_labels[:2600])
    dm.get_reader(str(tmp_path), few, CPU, "mlp")
    out = capsys.readouterr().out
    assert re.search(r"Training the classifier mlp .*\n  about \d+\.\d min on this machine \(210 batches of 128\)\n"
                     r"Its test accuracy", out), out


def test_outside_readers_are_other_families_than_the_judge():
    """The judge and the ResNet build the sets (labels, filter); the readers that measure them share neither
    their layers nor their recipes (the judge: 3 epochs of Adam at 1e-3, seed 0; the ResNet: 2 of AdamW)."""
    def layers(model):
        return [type(m) for m in model.modules() if not list(m.children())]
    assert "resnet" not in dm.READERS and layers(dm.resnet()) != layers(dm.Judge())
    assert any(isinstance(m, dm.ResidualBlock) for m in dm.resnet().modules())
    for name, reader in dm.READERS.items():
        optimizer = type(reader.optimizer(reader.build().parameters()))
        assert layers(reader.build()) != layers(dm.Judge()), name
        assert (optimizer, reader.epochs, reader.shift) != (torch.optim.Adam, 3, 0), name  # the judge's recipe
        assert layers(reader.build()) != layers(dm.resnet()) and reader.epochs != dm.BUILDER.epochs, name
        assert reader.file not in (dm.CLASSIFIERS["judge"].file, dm.BUILDER.file)
    assert any(nn.Conv2d not in [type(m) for m in r.build().modules()] for r in dm.READERS.values())  # no conv at all


def test_label_accuracy_and_confidence_on_real_digits(judge, mnist):
    images, labels = dm.to_float(mnist.test_images[:2000]), mnist.test_labels[:2000]
    ref = dm.feature_stats(dm.judge_outputs(judge, dm.to_float(mnist.test_images), CPU)[0])
    right = dm.quality(*dm.judge_outputs(judge, images, CPU), ref, labels)
    wrong = dm.quality(*dm.judge_outputs(judge, images, CPU), ref, (labels + 1) % 10)
    assert right["label_accuracy"] > 0.97 and wrong["label_accuracy"] < 0.03
    assert 0.9 < right["confidence"] < 1


def test_fid_by_digit_finds_the_digit_that_is_missing_its_variety(judge, mnist):
    """Real training digits score low on every digit; replacing the 7s by copies of one 7 (no variety)
    makes digit 7, and only digit 7, stand out."""
    test_feats = dm.judge_outputs(judge, dm.to_float(mnist.test_images[:4000]), CPU)[0]
    images, labels = mnist.train_images[:4000].clone(), mnist.train_labels[:4000]
    fids = dm.fid_by_digit(dm.judge_outputs(judge, dm.to_float(images), CPU)[0], labels.numpy(),
                           test_feats, mnist.test_labels[:4000].numpy())
    sevens = (labels == 7).nonzero().flatten()
    images[sevens] = images[sevens[:3]].repeat(len(sevens) // 3 + 1, 1, 1)[:len(sevens)]  # three 7s only
    uniform = dm.fid_by_digit(dm.judge_outputs(judge, dm.to_float(images), CPU)[0], labels.numpy(),
                              test_feats, mnist.test_labels[:4000].numpy())
    assert uniform[7] > 3 * max(fids)
    assert uniform[:7] + uniform[8:] == pytest.approx(fids[:7] + fids[8:])


def test_misread_by_digit_names_the_digit_a_training_set_lacks(mnist):
    """A classifier that never saw a 7 misreads every 7 of the real test set, and far fewer of the
    others. (That the counts add up to the accuracy: test_evaluate_reports_label_accuracy_and_train_on_fake.)"""
    keep = mnist.train_labels[:6000] != 7
    no_sevens = dm.train_reader("judge", mnist.train_images[:6000][keep], mnist.train_labels[:6000][keep], CPU, epochs=1)
    misread = dm.misread_by_digit(no_sevens, mnist.test_images, mnist.test_labels, CPU)
    counts = torch.bincount(mnist.test_labels, minlength=10).tolist()
    assert misread[7] == counts[7]
    assert all(misread[d] < counts[d] / 2 for d in range(10) if d != 7)


def test_evaluate_reports_label_accuracy_and_train_on_fake(conditional_run, reader_cache, few_tests_dir, tmp_path):
    result = run_main("evaluate", "--eval_samples=500", "--n_train=500", f"--ckpt={conditional_run}/G_model.ckpt",
                      f"--data_dir={few_tests_dir}", f"--cache_dir={reader_cache}", f"--output_dir={tmp_path / 'o'}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Shipped judge:") and "labels" in lines[1] and "confidence" in lines[1]
    assert lines[2:].count(lines[0]) == 0  # the judge is loaded once
    assert any(l.startswith("train on 500 generated digits (labels: the digits G was asked for, kept where the "
                            f"judge reads them (p >= {dm.DATASET_FILTER:g}) and a ResNet agrees (p >= {dm.DATASET_AGREE:g}), "
                            f"centred like MNIST's, noise std {dm.DATASET_NOISE:g})") for l in lines)
    assert "Training" not in result.stdout  # the readers trained on real digits come from the cache
    rows = {l.split()[0]: l.split()[1:] for l in lines if l.split() and l.split()[0] in dm.READERS
            and l.split()[1].endswith("%")}  # the table's rows, not the per-digit ones
    assert sorted(rows) == sorted(dm.READERS)  # one row per outside reader, and the judge is not one of them
    per_digit = {l[:44].strip(): l[44:].split() for l in lines}
    fid_header = next(i for i, l in enumerate(lines) if l.startswith("FID per digit (vs that digit's test images)"))
    fid_rows = {l[:44].strip(): l[44:].split() for l in lines[fid_header:fid_header + 3]}
    assert len(fid_rows["FID per digit (vs that digit's test images)"]) == 10
    assert all(float(v) > 0 for v in fid_rows["generated"] + fid_rows["real: 10,000 training images"])
    copies = {l[:44].strip(): l[44:].split() for l in lines[lines.index(next(l for l in lines if l.startswith(
        "near-copies per digit"))):][:3]}  # a conditional G's near-copies, digit by digit, beside real digits'
    assert len(copies["generated"]) == len(copies["real: 500 test digits"]) == 10
    for name, (real, fake, gap, agree) in rows.items():
        real, fake, agree = (float(v.rstrip("%")) for v in (real, fake, agree))
        assert real > 85 and fake < real  # 10 steps of training are no substitute for MNIST (the fixture's readers
        # learned from 2,000-4,000 digits: 90-91% on these 1,000 test digits)
        assert float(gap) == pytest.approx(fake - real, abs=0.02)
        assert 0 <= agree <= 100
        # the per-digit counts add up to the accuracies (on the 1,000 test digits of few_tests_dir)
        misread = sum(int(v) for v in per_digit[f"{name} trained on generated digits"])
        assert misread == pytest.approx(10 * (100 - fake), abs=1)
        assert sum(int(v) for v in per_digit[f"{name} trained on real digits"]) == pytest.approx(10 * (100 - real), abs=1)


def test_reported_label_agreement_is_the_real_trained_reader_reading_the_set(mnist, reader_cache, monkeypatch, capsys):
    """The last column of the train-on-fake table: a set whose labels are the true ones (real digits
    standing in for a generator) reads near 100% to the readers trained on real digits; the same digits with
    every label shifted by one read near 0%."""
    images, labels = mnist.train_images[-2000:], mnist.train_labels[-2000:]
    cfg = {**config(), "cache_dir": reader_cache}
    G = dm.Generator(dm.NOISE_DIM, dm.N_CLASSES)
    agreements = []
    for shown in (labels, (labels + 1) % 10):
        monkeypatch.setattr(dm, "labeled_fakes", lambda *a, **k: (images, shown))
        monkeypatch.setattr(dm, "train_reader", lambda name, x, y, device: dm.Judge().eval())  # skip training
        few_tests = mnist._replace(test_images=mnist.test_images[:500], test_labels=mnist.test_labels[:500])
        dm.report_train_on_fake(G, cfg, len(images), few_tests, CPU)
        out = capsys.readouterr().out.splitlines()
        agreements.append([float(l.split()[-1].rstrip("%")) for l in out if l.split() and l.split()[0] in dm.READERS
                           and l.split()[1].endswith("%")])
        assert len(agreements[-1]) == len(dm.READERS)
    assert all(a > 90 for a in agreements[0]) and all(a < 5 for a in agreements[1])
