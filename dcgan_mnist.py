"""
DCGAN on MNIST in one script: train a generator of handwritten digits, watch it learn, and measure it.

    python dcgan_mnist.py                        # train (edit the constants below or pass --name=value)
    python dcgan_mnist.py sample --n=1000 --png_dir=fakes   # 8x8 grid + N separate PNGs for FID tools
    python dcgan_mnist.py evaluate               # FID / score / digit coverage / train-on-fake accuracy
    python dcgan_mnist.py --conditional=True     # a conditional DCGAN (sample --digit=7: a grid of sevens)
    python dcgan_mnist.py dataset --n=60000 --dataset_dir=fake_mnist   # a labeled fake MNIST, MNIST's files
    python dcgan_mnist.py --help                 # every hyperparameter with its default

Sections, in reading order. A first read: the [DCGAN] ones, 1-6, are the algorithm, ending with the training
loop (about 520 lines); 7-11 can be skipped.
   1. [DCGAN] hyperparameters                    7. [bookkeeping] what the loop calls: machines, Ctrl-C, printing
   2. [DCGAN] seeding and device                 8. [measuring] the quality judge (FID, score, digits, copies)
   3. [DCGAN] data                               9. [files and safety] checkpoints, IDX files, plots
   4. [DCGAN] models (Discriminator, Generator) 10. [using G] sampling, evaluation, the fake dataset
   5. [DCGAN] training steps (D_train, G_train) 11. [command line] options (argparse), validation and main
   6. [DCGAN] the training loop (train_one_epoch, end_of_epoch, train)
"""
import argparse
import ast
import contextlib
import copy
import difflib
import errno
import functools
import hashlib
import inspect
import io
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import time
import warnings
from collections import Counter, namedtuple
from dataclasses import asdict, dataclass, field

import cv2
import matplotlib
matplotlib.use("Agg")  # draw plots to files; no screen needed
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# -----------------------------------------------------------------------------
# 1. [DCGAN] Hyperparameters: edit here, or override any of them as --lowercase_name=value
# data
DATA_DIR = "MNIST/"     # MNIST's four files are read from (or downloaded to) <DATA_DIR>/MNIST/raw/
OUTPUT_DIR = "outputs"  # checkpoints, sample grids, plots
BATCH_SIZE = 128        # images per training step
MERGE_TEST = True       # train on train+test (70,000 digits); False: the 60,000 training digits only (honest FID)
# model
NOISE_DIM = 100         # size of the generator's input noise vector z
NGF = 64                # G's width: channels of its last hidden layer (x2, x4 before it); the tutorial's 64
NDF = 32                # D's width (first layer; x2, x4 after it): half the tutorial's, same FID in 2/3 the time
CONDITIONAL = False     # True: G(z, y) draws the digit y it is asked for, D(x, y) judges the pair
# optimization
LR_D = 1.6e-3           # discriminator Adam learning rate (twice 8e-4: the same FID in a third of the time)
LR_G = 1.6e-3           # generator Adam learning rate
BETAS = (0.5, 0.999)    # Adam betas for both; beta1=0.5 (DCGAN paper) keeps the two players from oscillating
REAL_LABEL = 1.0        # target for real images in D's loss; 0.9 is "one-sided label smoothing"
G_STEPS = 2             # G steps per D step (the tutorial's 1): G keeps up with D; a better FID per minute
EMA_DECAY = 0.999       # we sample from a moving average of G's weights (0 = plain G; see ema_update)
MODE_SEEKING = 2.0      # conditional GAN only: reward G for two different digits y from two noises (0 = off; 2 beat 1)
# how long
EPOCHS = 7              # passes over the data (one epoch = 70,000 images; 60,000 with MERGE_TEST=False)
CONDITIONAL_DEFAULTS = {"g_steps": 1, "epochs": 10, "ndf": 64}  # a conditional GAN's, unless given (measured there)
GPU_DEFAULTS = {"ngf": 128, "ndf": 128, "epochs": 20, "early_stopping": 10}  # a GPU's, unless given: wide is free
EARLY_STOPPING = 5      # stop once this many epochs have passed without improvement of SELECT_BY (when measured)
MAX_MINUTES = 28.0      # stop before an epoch that would end past this budget (0 = no limit)
MAX_BATCHES = 0         # 0 = whole epoch; N > 0 = at most N batches per epoch (smoke runs)
RESUME = False          # continue from <OUTPUT_DIR>/last.ckpt (the whole training state)
# quality
SELECT_BY = "fid"       # what G_model.ckpt and early stopping follow: "fid" or "g_loss" (the tutorial's)
MIN_DELTA = 0.03        # SELECT_BY improves only when 3% below its last improvement (a dip of noise is not one)
EVAL_EVERY = 1          # compute FID every N epochs (0 = never; smoke runs skip it unless given)
EVAL_SAMPLES = 10000    # generated images per FID evaluation (compared with the 10,000 test images)
EVAL_DRAWS = 2          # FID = the mean of this many draws of EVAL_SAMPLES (one draw's FID moves by 3-10%)
SAMPLE_EVERY = 1        # save an 8x8 grid of the fixed noise every N epochs (and after the last)
CACHE_DIR = "~/.cache/dcgan_mnist"  # `evaluate`'s readers trained on real digits, once (the judge ships: judges/)
# fake dataset
DATASET_NOISE = 2.0     # noise std for `dataset` and train-on-fake (training uses 1): wider noise draws rarer digits
DATASET_FILTER = 0.5    # conditional G: `dataset` draws 3x, keeps digits the judge reads as asked, p >= this (0: all)
DATASET_AGREE = 0.9     # ... and that a second builder, a ResNet, also reads as asked, p >= this (0: the judge alone)
DATASET_CENTER = True   # `dataset` moves each digit so that its centre of mass is the image's centre, as in MNIST
# system
SEED = 0                # seeds python, numpy and torch: the same seed gives the same run on CPU
DEVICE = "auto"         # "auto" picks cuda, then mps, then cpu; or "cpu", "cuda", "cuda:1", "mps"
CUDA_GRAPHS = True      # CUDA: record the training step once, replay it (one launch, not hundreds): 4x faster, same G
AMP = True              # bf16 autocast where the hardware does bf16 natively (CUDA; CPUs with AVX512-BF16/AMX)
CHANNELS_LAST = True    # NHWC memory layout: faster convolutions on CPU (oneDNN) and tensor cores
DETERMINISTIC = True    # cudnn deterministic algorithms (reproducible GPU runs, somewhat slower)

CONFIG_NAMES = [k for k, v in list(globals().items())  # the names above, in order
                if k.isupper() and isinstance(v, (int, float, str, tuple))]

# Every random draw outside training has its own seed, SEED + one of these, so evaluating or sampling
# never moves the training's random streams (and a resumed run stays identical to a straight one).
SEED_OFFSET_GRID = 0        # the fixed noise of the progress grids (and `sample`'s fake_grid.png)
SEED_OFFSET_BN_REFRESH = 1  # noise that recomputes the averaged G's BatchNorm statistics
SEED_OFFSET_EVAL = 2        # the EVAL_SAMPLES images scored for FID
SEED_OFFSET_PNGS = 3        # `sample --png_dir` images
SEED_OFFSET_DATASET = 4     # `dataset`: the training digits (the test digits use SEED_OFFSET_DATASET + 1)
N_CLASSES = 10              # digits 0-9: the labels of a conditional G and D


# -----------------------------------------------------------------------------
# 2. [DCGAN] Seeding and device
def set_seed(seed, deterministic=True):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the CPU and every CUDA device
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic  # autotuned kernels are faster but vary


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# -----------------------------------------------------------------------------
# 3. [DCGAN] Data: MNIST train + test (70,000 digits; MERGE_TEST=False: train only), decoded once into one uint8 tensor.
# A per-sample PIL pipeline (ToTensor, Normalize) costs more than the GAN step on small machines;
# indexing one tensor and normalizing the whole batch at once costs nothing.
MNIST = namedtuple("MNIST", "train_images train_labels test_images test_labels")  # images uint8 (N, 28, 28)
RAW_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def load_mnist(data_dir):
    """The four MNIST files as an MNIST tuple, each checked first (torchvision downloads any that are missing)."""
    raw = os.path.join(os.path.abspath(os.path.expanduser(data_dir)), "MNIST", "raw")
    present = [f for f in RAW_FILES if os.path.exists(os.path.join(raw, f))]
    for name in present:  # a damaged file is named, not mistaken for a missing one
        problem = idx_file_problem(os.path.join(raw, name))
        if problem:
            die(f"{os.path.join(raw, name)} is damaged: {problem}. Delete it and torchvision will download "
                f"it again (or put a good copy there)", 1)
    try:
        if len(present) < 4:
            import torchvision  # only to download: importing it takes a second and a half
            for train in (True, False):
                torchvision.datasets.MNIST(data_dir, train=train, download=True)
    except Exception as e:  # offline, or the download failed
        die(f"MNIST is not in {raw} and could not be downloaded ({type(e).__name__}). "
            f"Put the four raw files {', '.join(RAW_FILES)} in {raw}/ (or pass --data_dir=<folder>)", 1)
    return MNIST(*(read_idx(os.path.join(raw, f)) for f in RAW_FILES))


def read_idx(path):
    """An IDX file is a header (images: 16 bytes, labels: 8), then one byte per pixel or label. Images come back
    as uint8 (N, 28, 28), labels as int64 (N,)."""
    images = "images" in os.path.basename(path)
    data = torch.from_numpy(np.fromfile(path, np.uint8, offset=16 if images else 8))
    return data.view(-1, 28, 28) if images else data.long()


def to_float(images):
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [-1, 1]: ToTensor() + Normalize((0.5,), (0.5,))."""
    return images.unsqueeze(1).float().div(127.5).sub(1.0)


Data = namedtuple("Data", "images labels")  # what we train on: uint8 (N, 28, 28) and digits (N,)


# -----------------------------------------------------------------------------
# 4. [DCGAN] Models. D ends in a logit (no Sigmoid): BCEWithLogitsLoss is stable, and safe under autocast.
# With n_classes > 0 (CONDITIONAL) both take the digit label y; with 0 they are the tutorial's DCGAN.
class Discriminator(nn.Module):
    def __init__(self, n_classes=0, ndf=NDF):
        super().__init__()
        self.n_classes = n_classes
        self.main = nn.Sequential(
            # input is (1) x 28 x 28
            nn.Conv2d(1, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),  # no BatchNorm on the input layer (DCGAN paper)
            # state size. (ndf) x 14 x 14
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*2) x 7 x 7
            nn.Conv2d(ndf * 2, ndf * 4, 3, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*4) x 4 x 4
            nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False),
            # state size. (1) x 1 x 1: a logit; torch.sigmoid of it is D's probability that x is real
        )
        if n_classes:
            # Projection discriminator (Miyato & Koyama 2018): the label adds its own 4x4 filter on the
            # last features, logit = <w + embed(y), h(x)>, so D judges "a real digit y?" from the image
            # alone. Against 10 label maps on D's input it read right more often and trained a better
            # classifier (benchmarks/conditional.py; README).
            self.embed = nn.Embedding(n_classes, ndf * 4 * 4 * 4)

    def forward(self, x, y=None):
        if not self.n_classes:
            return self.main(x)
        h = self.main[:-1](x)  # state size. (ndf*4) x 4 x 4
        projection = (self.embed(y) * h.flatten(1)).sum(1)
        return self.main[-1](h) + projection.view(-1, 1, 1, 1)


class Generator(nn.Module):
    def __init__(self, noise_dim=NOISE_DIM, n_classes=0, ngf=NGF):
        super().__init__()
        self.n_classes = n_classes
        self.main = nn.Sequential(
            # input is Z: (noise_dim) x 1 x 1, and for a conditional G the one-hot label: (n_classes) x 1 x 1
            nn.ConvTranspose2d(noise_dim + n_classes, ngf * 4, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            # state size. (ngf*4) x 4 x 4
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            # state size. (ngf*2) x 8 x 8
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            # state size. (ngf) x 16 x 16
            nn.ConvTranspose2d(ngf, 1, 4, 2, 3, bias=False),
            nn.Tanh(),
            # state size. (1) x 28 x 28, in [-1, 1] like the normalized data
        )

    def forward(self, z, y=None):
        if self.n_classes:  # y: digit labels (N,), or (N, n_classes) weights to blend digits
            y = F.one_hot(y, self.n_classes).to(z.dtype) if y.dtype == torch.long else y.to(z.dtype)
            z = torch.cat([z, y.view(-1, self.n_classes, 1, 1)], 1)
        return self.main(z)


def weights_init(m):
    """DCGAN init: conv weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02) and shift 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, 0.0, 0.02)  # like the shared 4x4 filter it is added to


GAN = namedtuple("GAN", "G D G_ema G_optimizer D_optimizer G_scaler D_scaler")  # scalers: None but in float16


def build_models(cfg, device):
    """G and D (DCGAN init), the averaged copy of G that we sample from, and two separate Adams."""
    n_classes = N_CLASSES if cfg["conditional"] else 0
    G = Generator(cfg["noise_dim"], n_classes, cfg["ngf"]).to(device)
    D = Discriminator(n_classes, cfg["ndf"]).to(device)
    G.apply(weights_init)
    D.apply(weights_init)
    if use_channels_last(device, cfg["channels_last"]):
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)  # what we sample and checkpoint
    cuda = device.type == "cuda"  # one fused kernel for the whole Adam update; capturable: in a CUDA graph
    D_optimizer = torch.optim.Adam(D.parameters(), lr=cfg["lr_d"], betas=cfg["betas"], fused=cuda, capturable=cuda)
    G_optimizer = torch.optim.Adam(G.parameters(), lr=cfg["lr_g"], betas=cfg["betas"], fused=cuda, capturable=cuda)
    float16 = precision(device, cfg["amp"])[0] == torch.float16
    G_scaler = torch.amp.GradScaler(device.type) if float16 else None  # one per player: each steps on its own
    D_scaler = torch.amp.GradScaler(device.type) if float16 else None
    return GAN(G, D, G_ema, G_optimizer, D_optimizer, G_scaler, D_scaler)


# -----------------------------------------------------------------------------
# 5. [DCGAN] Training steps. The GAN game: D learns to tell real digits from G's fakes, G learns to fool D.
def D_train(real, G, D, D_optimizer, noise_dim, real_label=1.0, amp=None, labels=None, fake_labels=None, scaler=None):
    """One discriminator step: maximize log D(x) + log(1 - D(G(z))) on a real batch x and a fresh fake
    batch G(z), i.e. minimize binary cross-entropy with targets 1 (real) and 0 (fake).
    The fake is detached for D's loss: this step must update D only, and back-propagating into G here
    would be wasted work. Returns (loss, fake, D(x), D(G(z))): the fake still carries G's graph, so
    G_train reuses it instead of running G twice; D(x) and D(G(z)) are D's mean probabilities of "real".
    Conditional GAN: `labels` are the real batch's digits, D judges (image, label) pairs; G draws
    `fake_labels` (default: the same digits; see pair_labels). amp: the autocast dtype (None: float32);
    scaler: a float16 run's GradScaler."""
    fake_labels = labels if fake_labels is None else fake_labels
    z = torch.randn(real.shape[0], noise_dim, 1, 1, device=real.device)
    with autocast(real.device.type, amp):
        fake = G(z, fake_labels)
        out_real = D(real, labels)
        out_fake = D(fake.detach(), fake_labels)  # detach: D's loss must not backpropagate into G
        loss = (F.binary_cross_entropy_with_logits(out_real, torch.full_like(out_real, real_label))
                + F.binary_cross_entropy_with_logits(out_fake, torch.zeros_like(out_fake)))
    D_optimizer.zero_grad(set_to_none=True)
    backward_and_step(loss, D_optimizer, scaler)
    d_x, d_g_z = (torch.sigmoid(out.detach().float()).mean() for out in (out_real, out_fake))
    return loss.detach(), fake, d_x, d_g_z


def G_train(fake, D, G_optimizer, amp=None, labels=None, mode_seeking=0.0, scaler=None):
    """One generator step: maximize log D(G(z)), i.e. BCE with target 1 ("real") on the fake batch.
    This is the non-saturating loss of the GAN paper: minimizing log(1 - D(G(z))) instead would give G
    almost no gradient early on, when D rejects its fakes easily. Returns that loss.
    mode_seeking > 0 (conditional GAN, fakes drawn in pairs by pair_labels): also maximize how far apart
    the two digits of each pair are (Mao et al. 2019, "Mode seeking GANs"). A conditional G tends to
    ignore z, because the label already tells it what to draw; then every 7 looks alike."""
    D.requires_grad_(False)  # gradients flow through D to G, but D's own weight gradients are not needed
    with autocast(fake.device.type, amp):
        out = D(fake, labels)
        loss = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
    total = loss
    if mode_seeking and len(fake) > 1:  # pairs: fake i and n - n//2 + i show one digit from two noises
        n, half = len(fake), len(fake) // 2
        distance = (fake[:half] - fake[n - half:]).float().abs().mean()  # mean pixel difference, 0 to 2
        total = loss + mode_seeking / (distance + 1e-5)  # large when the pairs look alike
    G_optimizer.zero_grad(set_to_none=True)
    backward_and_step(total, G_optimizer, scaler)
    D.requires_grad_(True)
    return loss.detach()


def pair_labels(labels):
    """The digits G draws for the mode-seeking term: the first half of the batch's labels, then again
    (fakes i and n - n//2 + i share a digit). Each half still follows the data's digit frequencies."""
    n = len(labels)
    return torch.cat([labels[:n - n // 2], labels[:n // 2]])


def train_step(gan, cfg, amp, real, labels, ema_d):
    """One batch of the GAN game: a D step, G_STEPS G steps, the moving average of G (ema_d: its d, ema_decay).
    Returns D_loss, G_loss, D(x), D(G(z)) as one tensor, left on the device (reading it waits for the device)."""
    mode_seeking = cfg["mode_seeking"] if cfg["conditional"] else 0.0  # a conditional GAN's term
    fake_labels = pair_labels(labels) if mode_seeking else labels  # what G draws
    ############################
    # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
    ############################
    d_loss, fake, d_x, d_g_z = D_train(real, gan.G, gan.D, gan.D_optimizer, cfg["noise_dim"], cfg["real_label"],
                                       amp, labels, fake_labels, gan.D_scaler)
    ############################
    # (2) Update G network: maximize log(D(G(z))) (+ the mode-seeking term, conditional GAN)
    ############################
    g_loss = G_train(fake, gan.D, gan.G_optimizer, amp, fake_labels, mode_seeking, gan.G_scaler)
    for _ in range(cfg["g_steps"] - 1):  # more G steps, each on a new fake batch (the seed tutorial's remedy)
        with autocast(real.device.type, amp):
            fake = gan.G(torch.randn(len(real), cfg["noise_dim"], 1, 1, device=real.device), fake_labels)
        g_loss = G_train(fake, gan.D, gan.G_optimizer, amp, fake_labels, mode_seeking, gan.G_scaler)
    ############################
    # (3) moving average of G: the generator we evaluate, sample and save
    ############################
    ema_update(gan.G_ema, gan.G, ema_d)
    return torch.stack([d_loss, g_loss, d_x, d_g_z])


def ema_decay(decay, step):
    """The moving average's d at optimizer step `step`: min(decay, (1 + step) / (10 + step)), a warm-up, so that the
    average does not drag the random initial weights along. A long one (d reaches 0.999 at step 8,990): in a 7-epoch
    run it weights step t of s about like (t/s)^8, roughly the run's last tenth (docs/results.md)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(G_ema, G, d):
    """G_ema <- d * G_ema + (1 - d) * G, weights only (BatchNorm statistics: refresh_bn_stats); d: ema_decay()."""
    for e, p in zip(G_ema.parameters(), G.parameters()):
        e.lerp_(p, 1.0 - d)


# -----------------------------------------------------------------------------
# 6. [DCGAN] The training loop: train_one_epoch (the batches), end_of_epoch (FID, early stopping, checkpoints), train
TRACKED = ("d_loss", "g_loss", "d_x", "d_g_z")  # per-batch values averaged over each epoch
QUALITY_KEYS = ("fid", "score", "min_share", "max_share", "confidence", "label_accuracy")  # see quality()
METRICS_COLUMNS = ("epoch", *TRACKED, *QUALITY_KEYS, "seconds")  # the history of each epoch, and metrics.csv


@dataclass
class TrainState:
    """Where training stands. last.ckpt keeps it (as a plain dict), so --resume continues exactly."""
    epoch: int = 1             # the epoch being trained, from 1
    next_batch: int = 0        # first batch of this epoch still to train (> 0 after a mid-epoch Ctrl-C)
    perm: torch.Tensor = None  # this epoch's shuffle order
    sums: list = field(default_factory=lambda: [0.0] * len(TRACKED))  # this epoch's sums of TRACKED
    step: int = 0              # optimizer steps so far (the moving average's warm-up counts them)
    best: float = math.inf     # best SELECT_BY value so far (lower is better)
    bad_epochs: int = 0        # epochs since SELECT_BY last improved (early stopping)
    best_fid: float = math.inf  # best FID so far (G_best_fid.ckpt)
    elapsed: float = 0.0       # seconds of training so far, earlier runs of a resumed one included
    grids: list = field(default_factory=list)  # the sample grids written, for progress.gif
    history: dict = field(default_factory=lambda: {k: [] for k in METRICS_COLUMNS})  # per epoch (metrics.csv)


def train_one_epoch(data, step, state, cfg, n_batches):
    """The tutorial's batch loop, from state.next_batch to the end of the epoch (or a Ctrl-C).
    step(real, labels, ema_d): one batch of the game (train_step, or on CUDA its CUDA graph: training_step)."""
    bs, device = cfg["batch_size"], data.images.device
    if state.perm is None:  # a new shuffle each epoch (kept in last.ckpt for a resume)
        state.perm = torch.randperm(len(data.images))
    perm = state.perm.to(device)
    sums = torch.tensor(state.sums, device=device)  # summed on the device: see the sync note below
    bar = tqdm(range(state.next_batch, n_batches), desc=f"epoch {state.epoch}", initial=state.next_batch,
               total=n_batches, leave=False, disable=None)  # None: no bar where stderr is not a terminal (a log)
    for i in bar:
        idx = perm[i * bs:(i + 1) * bs]
        real = to_float(data.images[idx])
        labels = data.labels[idx] if cfg["conditional"] else None  # the digits, for a conditional GAN
        sums += step(real, labels, ema_decay(cfg["ema_decay"], state.step))  # D step, G steps, moving average
        state.step += 1
        state.next_batch = i + 1
        if i % 10 == 0 or i == n_batches - 1 or STOP["signal"]:
            means = [s / (i + 1) for s in sums.tolist()]  # note: a CPU-GPU sync point, so not every batch
            if not all(map(math.isfinite, means)):
                bar.close()
                die(f"the loss became {means[0] + means[1]} in epoch {state.epoch}, batch {i + 1}; stopped "
                    f"without saving (the last good checkpoints in {cfg['output_dir']} are untouched). "
                    f"Try lower learning rates", 3)
            bar.set_postfix({"D_loss": f"{means[0]:.3f}", "G_loss": f"{means[1]:.3f}",
                             "D(x)": f"{means[2]:.2f}", "D(G(z))": f"{means[3]:.2f}"})
            if STOP["signal"]:
                break
    bar.close()
    state.sums = sums.tolist()
    return state.next_batch >= n_batches  # False: a signal stopped us inside the epoch


def end_of_epoch(state, gan, cfg, judging, n_batches, out):
    """Epoch means, quality of the averaged G (FID when it is due), and the best checkpoints."""
    history = state.history
    history["epoch"].append(state.epoch)
    for name, total in zip(TRACKED, state.sums):
        history[name].append(total / state.next_batch)  # the batches trained (n_batches, or more after a resume)
    device = next(gan.G_ema.parameters()).device
    seed, size = cfg["seed"] + SEED_OFFSET_BN_REFRESH, 2 * cfg["batch_size"]  # noise batches twice a training batch
    refresh_bn_stats(gan.G_ema, cfg["noise_dim"], device, seed, size)  # the averaged G's own BatchNorm statistics
    metrics = {}
    if judging.every and state.epoch % judging.every == 0:
        metrics = measure(gan.G_ema, cfg, judging, device)[0]
    for k in QUALITY_KEYS:
        history[k].append(metrics.get(k, math.nan))
    if metrics and metrics["fid"] < state.best_fid:
        state.best_fid = metrics["fid"]
        atomic_save(gan.G_ema.state_dict(), os.path.join(out, "G_best_fid.ckpt"))
    value = history[judging.select_by][-1]
    if not math.isnan(value):  # early-stopping bookkeeping, and the selected checkpoints
        epochs_since_last = judging.every if judging.select_by == "fid" else 1  # FID: every EVAL_EVERY epochs
        keep, state.best, state.bad_epochs = improved(value, state.best, state.bad_epochs, epochs_since_last,
                                                      cfg["min_delta"])
        if keep:
            atomic_save(gan.G_ema.state_dict(), os.path.join(out, "G_model.ckpt"))
            atomic_save(gan.D.state_dict(), os.path.join(out, "D_model.ckpt"))
    return metrics


def improved(value, best, bad_epochs, epochs_since_last=1, min_delta=0.0):
    """Early-stopping bookkeeping: (keep this epoch's G as G_model.ckpt, the value of the last improvement, epochs
    without improvement); epochs_since_last: epochs since the value was last measured. A value improves only if more
    than min_delta (a fraction) below the last improvement: a dip of noise cannot set a mark no later epoch beats. An
    epoch within that margin is kept all the same: it has trained longer, and the difference is noise."""
    if value < best * (1 - min_delta):
        return True, value, 0
    return value < best * (1 + min_delta), best, bad_epochs + epochs_since_last


def train(cfg, given=()):
    """Train until EPOCHS, early stopping, MAX_MINUTES or Ctrl-C; save everything on the way."""
    cfg, given, saved = settings_to_train(cfg, given)  # --resume: the saved run's, with what was changed now
    out, device = cfg["output_dir"], pick_device(cfg["device"])
    amp = say_machine(device, cfg, given)  # the device, its precision (autocast dtype or None) and defaults
    data, judging, gan, fixed_noise, state = setup_training(cfg, given, saved, device)
    fid = fid_seconds(gan.G_ema, cfg, judging, device)  # what each epoch's FID adds to it (the forecast)
    start_time = time.time() - state.elapsed  # the time budget counts the earlier part of a resumed run
    n_batches = math.ceil(len(data.images) / cfg["batch_size"])
    n_batches = min(n_batches, cfg["max_batches"] or n_batches)
    reason = resume_notice(state, cfg, n_batches)
    first_epoch = state.epoch
    with stop_after_the_batch():  # Ctrl-C or SIGTERM: finish the batch, save, and say how to resume
        while reason is None and not STOP["signal"]:
            epoch_start = time.time()
            step = training_step(gan, cfg, amp, device)  # D step, G steps, moving average (on CUDA: a CUDA graph)
            if state.epoch == first_epoch:  # the forecast times the first epoch this run trains
                step = timed(step, lambda spb: forecast(spb, state, cfg, n_batches, time.time() - start_time, fid))
            if not train_one_epoch(data, step, state, cfg, n_batches):
                break  # Ctrl-C inside the epoch: last.ckpt continues from the next batch
            metrics = end_of_epoch(state, gan, cfg, judging, n_batches, out)
            seconds = time.time() - epoch_start
            state.history["seconds"].append(seconds)
            save_metrics(state.history, os.path.join(out, "metrics.csv"))
            reason = stop_reason(state, cfg, time.time() - start_time, seconds)
            if state.epoch % cfg["sample_every"] == 0 or reason:
                save_grid(draw_fixed(gan.G_ema, fixed_noise), os.path.join(out, f"samples_epoch_{state.epoch:03d}.png"),
                          nrow=grid_size(cfg["conditional"]))
                state.grids.append(f"samples_epoch_{state.epoch:03d}.png")
            print(epoch_line(state, cfg, metrics, judging, seconds), flush=True)
            state.epoch, state.next_batch, state.perm, state.sums = state.epoch + 1, 0, None, [0.0] * len(TRACKED)
            state.elapsed = time.time() - start_time
            save_training_state(os.path.join(out, "last.ckpt"), gan, fixed_noise, state, cfg, given)
    if STOP["signal"]:  # saves last.ckpt, says how to continue, exits 130 (143 for SIGTERM)
        interrupted(state, gan, fixed_noise, cfg, given, start_time)
    finish(state, gan, cfg, judging, reason, data, fixed_noise, start_time)
    return state.history


# -----------------------------------------------------------------------------
# 7. [bookkeeping] What the loop calls that a first read can skip: the precision and defaults each machine gets, the
# averaged G's BatchNorm statistics, setting a run up and saying what to expect, Ctrl-C, the CUDA graph, what each
# epoch prints and why training stops.
Judging = namedtuple("Judging", "every select_by judge ref_stats floor")  # what FID needs (plan_evaluation)
STOP = {"signal": None}  # set by the first Ctrl-C / SIGTERM; the loop stops after the current batch


def choose_precision(device_type, capability=(0, 0), cpu_bf16=False, amp=True):
    """(autocast dtype or None for float32, why): bf16 where the hardware computes it (GPUs 8.0+, CPUs with AVX512-BF16
    or AMX), float16 with a gradient scaler on older GPUs; else float32 (emulated, mixed precision is slower)."""
    if not amp:
        return None, "float32 (--amp=False)"
    if device_type == "cuda" and capability >= (8, 0):
        return torch.bfloat16, "bf16 autocast: this GPU computes bf16 natively"
    if device_type == "cuda":
        return torch.float16, "float16 autocast with a gradient scaler: this GPU has no bf16 units"
    if device_type == "cpu" and cpu_bf16:
        return torch.bfloat16, "bf16 autocast: this CPU computes bf16 natively (AVX512-BF16 or AMX)"
    if device_type == "cpu":
        return None, "float32: this CPU has no bf16 units (it would emulate them, slower)"
    return None, f"float32 on {device_type}"


def precision(device, amp=True):
    """choose_precision() for this machine's `device`."""
    cpu_bf16 = any(getattr(torch.cpu, f, lambda: False)()  # these checks exist since torch 2.3; older: float32
                   for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return choose_precision(device.type, capability(device), cpu_bf16, amp)


def capability(device):
    """A CUDA device's compute capability, e.g. (9, 0) for an H100/H200; (0, 0) for other devices."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def machine_defaults(device_type, capability=(0, 0)):
    """GPU_DEFAULTS on CUDA GPUs with tensor cores (7.0+): launches, not FLOPs, set a step's time (docs/results.md)."""
    return GPU_DEFAULTS if device_type == "cuda" and capability >= (7, 0) else {}


def backward_and_step(loss, optimizer, scaler=None):
    """loss.backward() and optimizer.step(); in float16 through the GradScaler (small gradients would underflow)."""
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def autocast(device_type, dtype):
    """Mixed precision in dtype (bf16, float16; None: float32); on CUDA no weight cache: a graph's replay casts anew."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype,
                                                                         cache_enabled=device_type != "cuda")


@torch.no_grad()
def refresh_bn_stats(G_ema, noise_dim, device, seed, batch_size=256, batches=8):
    """The averaged G's own BatchNorm statistics (G's belong to other weights): an average over batches of noise."""
    gen = torch.Generator().manual_seed(seed)
    for m in G_ema.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # None = plain average over the batches below
    G_ema.train()
    for _ in range(batches):
        z = torch.randn(batch_size, noise_dim, 1, 1, generator=gen).to(device)
        G_ema(z, balanced_labels(batch_size, device) if G_ema.n_classes else None)
    G_ema.eval()


def use_channels_last(device, channels_last):
    """NHWC, oneDNN's and the tensor cores' layout; not on MPS, where BatchNorm goes wrong in it (pytorch#134580)."""
    return channels_last and device.type in ("cpu", "cuda")


def settings_to_train(cfg, given):
    """(settings, names given, saved state or None); --resume: last.ckpt's settings with this command line's changes."""
    if not cfg["resume"]:
        return cfg, given, None
    saved = read_training_state(os.path.join(cfg["output_dir"], "last.ckpt"))
    return resume_settings(cfg, given, saved["config"]), set(given) | set(saved["given"]), saved


def say_machine(device, cfg, given):
    """Print the device, its precision and, on a new run, the GPU's defaults. Returns the autocast dtype."""
    amp, why = precision(device, cfg["amp"])
    print(f"Device: {device}; {why}", flush=True)
    if device.type == "cuda" and amp == torch.bfloat16:
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls left (cuDNN convs use it already)
    changed = [k for k in machine_defaults(device.type, capability(device)) if k not in given]
    cpu = {**{k: globals()[k.upper()] for k in changed}, **(CONDITIONAL_DEFAULTS if cfg["conditional"] else {})}
    if changed and not cfg["resume"]:
        print(f"GPU defaults: {', '.join(f'{k}={cfg[k]}' for k in changed)}: on a GPU a wider G and D cost no time "
              f"(a CPU's: {', '.join(f'{k}={cpu[k]}' for k in changed)}; --name=value chooses)", flush=True)
    return amp


def interrupted(state, gan, fixed_noise, cfg, given, start_time):
    """After a Ctrl-C: save the training state, print the command that continues, exit 128 + the signal."""
    state.elapsed = time.time() - start_time
    last = os.path.join(cfg["output_dir"], "last.ckpt")
    save_training_state(last, gan, fixed_noise, state, cfg, given)
    print(f"Interrupted; the training state is in {last}. Continue with:\n  {resume_command(sys.argv)}", flush=True)
    sys.exit(128 + STOP["signal"])


def setup_training(cfg, given, saved, device):
    """Everything train() needs, from scratch or from a read_training_state()."""
    os.makedirs(cfg["output_dir"], exist_ok=True)
    mnist = load_mnist(cfg["data_dir"])
    if cfg["merge_test"]:  # the tutorial's 70,000 digits (uint8, kept on the device)
        data = Data(torch.cat([mnist.train_images, mnist.test_images]).to(device),
                    torch.cat([mnist.train_labels, mnist.test_labels]).to(device))
    else:  # the 60,000 training digits: the test digits that FID compares with stay unseen
        data = Data(mnist.train_images.to(device), mnist.train_labels.to(device))
    judging = plan_evaluation(cfg, given, mnist, device)
    set_seed(cfg["seed"], cfg["deterministic"])
    gan = build_models(cfg, device)
    fixed_noise = torch.randn(grid_size(cfg["conditional"]) ** 2, cfg["noise_dim"], 1, 1,
                              generator=torch.Generator().manual_seed(cfg["seed"] + SEED_OFFSET_GRID))
    state = TrainState()
    if saved is not None:
        state, fixed_noise = restore_training_state(saved, gan, cfg)
        print(f"Resuming from {os.path.join(cfg['output_dir'], 'last.ckpt')} at epoch {state.epoch}"
              + (f", batch {state.next_batch}" if state.next_batch else ""))
    return data, judging, gan, fixed_noise, state


def plan_evaluation(cfg, given, mnist, device):
    """FID every EVAL_EVERY epochs, not in smoke runs unless --eval_every is given; without FID, SELECT_BY is g_loss."""
    every = cfg["eval_every"] if (cfg["max_batches"] == 0 or "eval_every" in given) else 0
    if cfg["eval_every"] and not every:
        print("Smoke run (--max_batches > 0): FID is skipped (pass --eval_every=1 to measure it)")
    select_by = cfg["select_by"] if every else "g_loss"
    if select_by != cfg["select_by"]:
        print("Without FID, G_model.ckpt and early stopping follow g_loss (--select_by=fid needs FID)")
    if not every:
        return Judging(0, select_by, None, None, None)
    judge = load_shipped("judge", device)
    return Judging(every, select_by, judge, *reference_stats(judge, mnist, device))


def forecast(seconds_per_batch, state, cfg, n_batches, seconds_so_far, fid=0.0):
    """Once the first batches are timed: an epoch's length (with `fid` s of FID), how many of EPOCHS fit MAX_MINUTES."""
    def span(seconds):  # '40 s' under two minutes (a GPU's epoch), else '2.0 min'
        return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    epoch = seconds_per_batch * n_batches + fid
    line = (f"Speed: {1 / seconds_per_batch:.2f} batches/s; an epoch ({n_batches} batches"
            + (f", then {fid:.0f} s of FID" if fid else "") + f") takes about {span(epoch)}, "
            f"{cfg['epochs']} epochs about {span(cfg['epochs'] * epoch)}")
    if cfg["max_minutes"]:
        left = cfg["max_minutes"] * 60 - seconds_so_far - (n_batches - state.next_batch) * seconds_per_batch - fid
        fit = min(cfg["epochs"], state.epoch + max(0, int(left // epoch)))
        if left < 0:
            line += (f". --max_minutes={cfg['max_minutes']:g} ends before this epoch does: it is trained to its "
                     f"end all the same, and is the last")
        elif fit < cfg["epochs"]:
            line += (f". --max_minutes={cfg['max_minutes']:g} stops after epoch {fit} of {cfg['epochs']} "
                     f"(--max_minutes=0 trains them all)")
    print(line, flush=True)


def resume_notice(state, cfg, n_batches):
    """"epochs" when a resumed run has trained every epoch already (it says so: never a silent "Done"), else None."""
    if state.epoch > cfg["epochs"]:
        print(f"Nothing to train: the saved run has trained {state.epoch - 1} epochs, and --epochs={cfg['epochs']} "
              f"(pass a larger --epochs to train on)")
        return "epochs"
    if state.next_batch and state.next_batch >= n_batches:
        print(f"The saved position, batch {state.next_batch} of epoch {state.epoch}, is past this run's "
              f"{n_batches} batches per epoch: epoch {state.epoch} ends there and the next one starts")
    return None


@contextlib.contextmanager
def on_stop_signals(handler):
    """handler for Ctrl-C and SIGTERM inside the block (a background process may start with SIGINT ignored)."""
    old_handlers = [signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)]
    try:
        yield
    finally:
        for s, h in zip((signal.SIGINT, signal.SIGTERM), old_handlers):
            signal.signal(s, h)


def stop_after_the_batch():
    """Training's Ctrl-C or SIGTERM: the loop finishes its batch, saves, and says how to resume."""
    STOP["signal"] = None
    return on_stop_signals(note_stop_signal)


def note_stop_signal(signum, frame):
    if STOP["signal"] is not None:
        quit_at_once(signum, frame)
    STOP["signal"] = signum
    print("\nStopping after this batch and saving last.ckpt (Ctrl-C again: quit now) ...", file=sys.stderr, flush=True)


def quit_at_once(signum, frame):
    """A second Ctrl-C / SIGTERM: leave at once, touching no file."""
    os._exit(128 + signum)


class Interrupted(BaseException):
    """The first Ctrl-C or SIGTERM in `sample`, `evaluate`, `dataset` (a BaseException: tqdm swallows Exceptions)."""


def interrupt(signum, frame):
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, quit_at_once)  # a second signal quits at once
    raise Interrupted(signum)


def training_step(gan, cfg, amp, device):
    """train_step for these models; on CUDA (CUDA_GRAPHS, not with float16's GradScalers) replayed as a CUDA graph."""
    step = functools.partial(train_step, gan, cfg, amp)  # step(real, labels, ema_d)
    return cuda_graphed(step) if device.type == "cuda" and cfg["cuda_graphs"] and gan.G_scaler is None else step


def timed(step, on_timed, first=11, last=31):
    """step, calling on_timed(seconds per batch) once calls `first` to `last` are timed (those before warm up)."""
    calls, start = 0, 0.0

    def run(*args):
        nonlocal calls, start
        result, calls = step(*args), calls + 1
        if calls in (first, last):
            result.tolist()
            start, seconds = time.time(), time.time() - start
            if calls == last:
                on_timed(seconds / (last - first))
        return result
    return run




def cuda_graphed(step, warmup=3):
    """step(real, labels, ema_d), run `warmup` times on a side stream (Adam makes its state), then recorded once on
    fixed inputs and replayed with each batch copied in; a batch of another size (an epoch's last) runs as it is."""
    graph, inputs, output, calls, side = None, None, None, 0, None

    def run(real, labels, ema_d):
        nonlocal graph, inputs, output, calls, side
        calls += 1
        if graph is None and calls > warmup:  # record: the kernels are captured, not run
            inputs = (real.clone(), None if labels is None else labels.clone(), torch.tensor(ema_d, device=real.device))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = step(*inputs)
        if graph is None or real.shape != inputs[0].shape:
            side = side or torch.cuda.Stream()  # one side stream, made on the first call
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = step(real, labels, ema_d)
            torch.cuda.current_stream().wait_stream(side)
            return result
        inputs[0].copy_(real)
        if labels is not None:
            inputs[1].copy_(labels)
        inputs[2].fill_(ema_d)
        graph.replay()
        return output
    return run


def epoch_line(state, cfg, metrics, judging, seconds):
    h = state.history
    line = (f"Epoch [{state.epoch}/{cfg['epochs']}]  D_loss: {h['d_loss'][-1]:.4f}  G_loss: {h['g_loss'][-1]:.4f}"
            f"  D(x): {h['d_x'][-1]:.2f}  D(G(z)): {h['d_g_z'][-1]:.2f}")
    if metrics:
        line += (f"  FID: {metrics['fid']:.2f} (real data: {judging.floor['fid']:.2f})  score: {metrics['score']:.2f}"
                 f"  digits: {metrics['min_share']:.1%}-{metrics['max_share']:.1%}")
        if cfg["conditional"]:  # how often the judge reads the digit G was asked for
            line += f"  labels: {metrics['label_accuracy']:.1%}"
    return line + f"  ({seconds:.0f}s)"


def stop_reason(state, cfg, seconds_so_far, epoch_seconds):
    """None to go on; else why this epoch is the last."""
    if state.bad_epochs >= cfg["early_stopping"]:
        return "early stopping"
    if state.epoch >= cfg["epochs"]:
        return "epochs"
    return "time budget" if cfg["max_minutes"] and seconds_so_far + epoch_seconds > cfg["max_minutes"] * 60 else None



def finish(state, gan, cfg, judging, reason, data, fixed_noise, start_time):
    """Say why training stopped, then the plots, the GIF and real-vs-fake."""
    out = cfg["output_dir"]
    if reason == "early stopping":
        message = f"|  Early stopping: no improvement of {judging.select_by} in {state.bad_epochs} epochs  |"
        print("=" * len(message) + "\n" + message + "\n" + "=" * len(message))
    elif reason == "time budget":
        print(f"Stopped: the next epoch would end past --max_minutes={cfg['max_minutes']:g}")
    save_plots(state.history, judging.floor["fid"] if judging.every else None, os.path.join(out, "losses.png"))
    save_progress_gif([os.path.join(out, g) for g in state.grids], os.path.join(out, "progress.gif"))
    selected, path = copy.deepcopy(gan.G_ema), os.path.join(out, "G_model.ckpt")
    if os.path.isfile(path):  # the generator you keep (G_model.ckpt), not the last epoch's
        selected.load_state_dict(load_checkpoint(path, next(selected.parameters()).device))
    save_real_vs_fake(to_float(data.images[:64].cpu()), draw_fixed(selected, fixed_noise)[:64],
                      os.path.join(out, "real_vs_fake.png"))
    print(f"Done in {(time.time() - start_time) / 60:.1f} min. Outputs in {out}/")


# -----------------------------------------------------------------------------
# 8. [measuring] The quality judge, a small LeNet trained on MNIST's 60,000 training digits: its 128 penultimate
# features give a Frechet distance to real digits (FID, with a LeNet for Inception), its class probabilities a score
# (max 10) and which digits G draws. It ships in judges/ (as `dataset`'s ResNet does), checked by its SHA-256: one
# yardstick for every machine and data folder. benchmarks/build_judges.py rebuilds them (a new yardstick).
SHIPPED = {"judge": "62da3279ebfa4baa526296574c31309d3e51b392d37fe54e320f5d08cce0d863",  # judges/<its file>.pt's
           "resnet": "09db5bcd63846d74ed06c1e3f1400e0102939c3e64c6460bb396d0227e9dfe1b"}  # SHA-256


def load_shipped(name, device):
    """The shipped classifier `name`, float32, eval mode; a missing, damaged or altered file: one line, exit 1."""
    path = shipped_path(name)
    problem = "is missing" if not os.path.isfile(path) else (
        None if file_sha256(path) == SHIPPED[name] else "is damaged or altered (not the SHA-256 this script expects)")
    if problem:
        die(f"{path} {problem}; restore it from the project (git checkout -- judges/, or copy its judges/ there)", 1)
    model = CLASSIFIERS[name].build()
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    torch.backends.cudnn.allow_tf32 = False  # float32 is float32 on a GPU too: the same FIDs as on a CPU
    print(f"Shipped {name}: judges/{os.path.basename(path)} (sha256 {SHIPPED[name][:12]})", flush=True)
    return in_fast_layout(model.to(device).eval(), device)


class Judge(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),   # state size. (32) x 12 x 12
            nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),  # state size. (64) x 4 x 4
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU())  # the 128 features used for FID

        self.classify = nn.Linear(128, 10)

    def forward(self, x):
        return self.classify(self.features(x))


def random_shift(x, pixels):
    """Each image moved by its own random whole-pixel offset in [-pixels, pixels] (the classic MNIST augmentation)."""
    dy, dx = torch.randint(-pixels, pixels + 1, (2, len(x)), device=x.device)
    return shift_images(x[:, 0], dy, dx, pixels, -1.0).unsqueeze(1)


def shift_images(x, dy, dx, pixels, background):
    """Images x (N, H, W), each moved up by dy[i] and left by dx[i] pixels (|d| <= pixels), `background` coming in."""
    n, size = len(x), x.shape[-1]
    padded = F.pad(x, (pixels,) * 4, value=background)
    rows = (torch.arange(size, device=x.device) + pixels + dy[:, None])[:, :, None]  # (n, size, 1)
    cols = (torch.arange(size, device=x.device) + pixels + dx[:, None])[:, None, :]  # (n, 1, size)
    return padded[torch.arange(n, device=x.device)[:, None, None], rows, cols]


@torch.no_grad()
def misread_by_digit(classifier, images, labels, device):
    """How many digits of each kind (0-9) the classifier reads wrong: where a fake training set falls short."""
    read = torch.cat([classifier(to_float(x.to(device))).argmax(1).cpu() for x in images.split(1000)])
    return torch.bincount(labels[read != labels], minlength=N_CLASSES).tolist()


def judge_accuracy(judge, images, labels, device):
    return 1 - sum(misread_by_digit(judge, images, labels, device)) / len(images)


def reader_path(cache_dir, mnist, name):
    """The reader's cache file, named by a digest of the digits it learned: a reader of other digits never serves."""
    digest = hashlib.sha256(mnist.train_images.numpy().tobytes())
    digest.update(mnist.train_labels.numpy().tobytes())
    return os.path.join(os.path.expanduser(cache_dir), f"{CLASSIFIERS[name].file}_{digest.hexdigest()[:16]}.pt")


def get_reader(cache_dir, mnist, device, name):
    """The outside reader `name` trained on these training digits: from the cache, or trained once and cached."""
    r, path = CLASSIFIERS[name], reader_path(cache_dir, mnist, name)
    reader = r.build().to(device)
    with contextlib.suppress(Exception):  # missing or unreadable: train a new one
        reader.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model"])
        return in_fast_layout(reader.eval(), device)
    print(f"Training the classifier {name} ({r.epochs} epochs) on these {len(mnist.train_images):,} training digits "
          f"(once; cached in {path}) ...")
    reader = train_reader(name, mnist.train_images, mnist.train_labels, device, say_time=True)
    accuracy = judge_accuracy(reader, mnist.test_images, mnist.test_labels, device)
    print(f"Its test accuracy: {accuracy:.2%}")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_save({"model": reader.state_dict(), "test_accuracy": accuracy}, path)
    except OSError as e:
        print(f"warning: could not cache {path} ({e.strerror}); it will be retrained next time")
    return in_fast_layout(reader, device)


def in_fast_layout(model, device):
    """A trained classifier in channels_last where that is fast (CPU: the judge 1.8x faster, the same outputs)."""
    return model.to(memory_format=torch.channels_last) if use_channels_last(device, True) else model


# Outside readers: other families than the judge's, other recipes. The judge labels or filters the fake sets, so its
# own kind would score a set tuned to it; these three, no part in any set, measure train-on-fake and read its labels.
def mlp():
    """No convolutions at all: every pixel is its own input, nothing is shared across positions."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def all_conv():
    """3x3 convolutions with BatchNorm, strides for pooling, global average pooling (Springenberg et al. 2015)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),    # state size. (32) x 28 x 28
        nn.Conv2d(32, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),   # state size. (32) x 14 x 14
        nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(),   # state size. (64) x 14 x 14
        nn.Conv2d(64, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),   # state size. (64) x 7 x 7
        nn.Conv2d(64, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(),   # state size. (64) x 7 x 7
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def vgg():
    """Pairs of 3x3 convolutions with BatchNorm, max pooling, dropout: many MNIST tutorials' CNN; a strong reader."""
    def pair(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*pair(1, 32), *pair(32, 64),  # state size. (64) x 7 x 7
                         nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 7 * 7, 10))


Reader = namedtuple("Reader", "build epochs optimizer file shift seed decay", defaults=(0, 1, True))
# shift: random_shift's pixels; seed: its own (the judge's is 0); decay: the learning rate falls linearly to 0
READERS = {  # name: a family unlike the judge's LeNet, and a recipe unlike the judge's (3 epochs of Adam 1e-3)
    "mlp": Reader(mlp, 10, lambda p: torch.optim.Adam(p, lr=1e-3), "reader_mlp_v1"),
    "allconv": Reader(all_conv, 3, lambda p: torch.optim.SGD(p, 0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
                      "reader_allconv_v1"),
    "vgg": Reader(vgg, 3, lambda p: torch.optim.Adam(p, lr=1e-3), "reader_vgg_v1", 2)}  # the strong one: 99.4%


# The second builder: a conditional G's digit stays only if the judge and this other family both read it as asked
# (DATASET_AGREE); the ambiguous digits one lets through, the other mostly stops. Like the judge, it measures no set.
class ResidualBlock(nn.Module):
    """relu(x + two 3x3 convolutions of x): the skip connection of He et al. 2016 ("Deep Residual Learning")."""
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(), nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels))

    def forward(self, x):
        return F.relu(x + self.body(x))


def resnet():
    """Three residual stages, max pooling between them, global average pooling: 99.4% on the real test digits."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), ResidualBlock(32),
        nn.MaxPool2d(2), nn.Conv2d(32, 64, 1, bias=False), ResidualBlock(64),    # state size. (64) x 14 x 14
        nn.MaxPool2d(2), nn.Conv2d(64, 128, 1, bias=False), ResidualBlock(128),  # state size. (128) x 7 x 7
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


BUILDER = Reader(resnet, 2, lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=1e-2), "builder_resnet_v2")
CLASSIFIERS = {  # every classifier train_reader trains, by name; the shipped judge: 99.0% on the real test digits
    "judge": Reader(Judge, 3, lambda p: torch.optim.Adam(p, lr=1e-3), "judge_lenet_v2", 0, 0, False),
    **READERS, "resnet": BUILDER}


def shipped_path(name):
    """judges/<its file>.pt beside this script (a notebook cell, without __file__: beside the working folder)."""
    here = os.path.dirname(os.path.abspath(globals().get("__file__", "dcgan_mnist.py")))
    return os.path.join(here, "judges", f"{CLASSIFIERS[name].file}.pt")


def train_reader(name, train_x, train_y, device, epochs=None, say_time=False):
    """Classifier `name` of CLASSIFIERS trained its own way on these uint8 digits (say_time: a forecast at batch 20)."""
    r, start = CLASSIFIERS[name], time.time()
    epochs = epochs or r.epochs
    steps = epochs * math.ceil(len(train_x) / 128)
    with torch.random.fork_rng(devices=[]):  # own seed; leaves the GAN's random streams alone
        torch.manual_seed(r.seed)
        model = r.build().to(device)
        opt = r.optimizer(model.parameters())
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps) if r.decay else None
        for epoch in range(epochs):
            perm = torch.randperm(len(train_x)).split(128)
            for i, idx in enumerate(tqdm(perm, desc=f"{name} epoch {epoch + 1}/{epochs}", leave=False, disable=None)):
                x = to_float(train_x[idx].to(device))
                loss = F.cross_entropy(model(random_shift(x, r.shift) if r.shift else x), train_y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if schedule:
                    schedule.step()
                if say_time and epoch == 0 and i == 19:
                    print(f"  about {(time.time() - start) / 20 * steps / 60:.1f} min on this machine "
                          f"({steps:,} batches of 128)", flush=True)
    return model.eval()


@torch.no_grad()
def class_probs(classifier, images, device):
    """float images in [-1, 1] -> the classifier's class probabilities (N, 10), on the CPU."""
    return torch.cat([F.softmax(classifier(x.to(device).float()), dim=1).float().cpu() for x in images.split(1000)])


@torch.no_grad()
def judge_outputs(judge, images, device):
    """float images in [-1, 1] -> (features float64 (N, 128), class probabilities (N, 10)), float32 in any run."""
    feats, probs = [], []
    for x in images.split(1000):
        with torch.autocast(device.type, enabled=False):
            f = judge.features(x.to(device).float())
            p = F.softmax(judge.classify(f), dim=1)
        feats.append(f.double().cpu())
        probs.append(p.double().cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, via symmetric eigendecompositions (stable)."""
    w, v = np.linalg.eigh(sigma1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(a @ sigma2 @ a), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def feature_stats(feats):
    return feats.mean(0), np.cov(feats, rowvar=False)


def quality(feats, probs, ref_stats, asked=None):
    """FID against ref_stats, score = exp(E KL(p(y|x) || p(y))), each digit's share, the judge's mean confidence and,
    given the digits asked for, how often the judge reads them (label accuracy)."""
    p_y = probs.mean(0)
    kl = (probs * (np.log(probs + 1e-12) - np.log(p_y + 1e-12))).sum(1)
    shares = np.bincount(probs.argmax(1), minlength=10) / len(probs)
    label_accuracy = float((probs.argmax(1) == np.asarray(asked)).mean()) if asked is not None else math.nan
    return {"fid": frechet_distance(*feature_stats(feats), *ref_stats), "score": float(np.exp(kl.mean())),
            "min_share": float(shares.min()), "max_share": float(shares.max()),
            "confidence": float(probs.max(1).mean()), "label_accuracy": label_accuracy}


def distance_chunks(a, b, device, shift=None, chunk=500):
    """Yields (|x|^2, |y|^2 - 2 x.y - shift(y)) for `chunk` rows x of a at a time against all rows y of b: squared
    distances less |x|^2 (a row's order is theirs), one addmm each; memory holds chunk x m, never n x m."""
    a, b = (torch.as_tensor(t).float().to(device) for t in (a, b))  # float32 first: Apple GPUs have no float64
    b2 = b.square().sum(1) - (0 if shift is None else shift.to(device))
    for x in a.split(chunk):
        yield x.square().sum(1, keepdim=True), torch.addmm(b2, x, b.T, alpha=-2)


def precision_recall(real, fake, device="cpu", k=3):
    """Improved precision (fidelity) and recall (diversity), Kynkaanniemi et al. 2019: the share of fakes inside some
    real digit's k-NN ball, and of real digits inside some fake's. FID mixes the two."""
    def inside(x, ref):  # |x - y|^2 <= radius(y)^2 for some y
        radii = torch.cat([x2 + d.kthvalue(k + 1, dim=1, keepdim=True).values  # k + 1: itself, at 0, comes first
                           for x2, d in distance_chunks(ref, ref, device)]).flatten()
        return torch.cat([(d <= -x2).any(1) for x2, d in distance_chunks(x, ref, device, radii)]).float().mean().item()
    return inside(fake, real), inside(real, fake)


def nearest_training(digits, train_digits, device="cpu"):
    """Each uint8 digit's pixel distance to its nearest training digit, and its index, both centred (center_digits)."""
    x, t = (center_digits(d).flatten(1).float() / 255 for d in (digits, train_digits))
    squared, indices = [], []
    for x2, d in distance_chunks(x, t, device):
        nearest = d.min(1)
        squared.append(x2.flatten() + nearest.values)
        indices.append(nearest.indices)
    return torch.cat(squared).clamp(min=0).sqrt().cpu(), torch.cat(indices).cpu()


def near_copies(digits, mnist, test_distances, device="cpu"):
    """nearest_training to all 70,000 digits; the share closer than 99% of test digits are to training digits (~1%)."""
    dist, idx = nearest_training(digits, torch.cat([mnist.train_images, mnist.test_images]), device)
    return dist, idx, (dist < copy_threshold(test_distances)).float().mean().item()


def copy_threshold(test_distances):
    """Closer to a training digit than 99% of the real test digits are: a near-copy."""
    return torch.quantile(test_distances, 0.01)


def fidelity(digits, mnist, judge, device, n=10000, real=None):
    """Precision, recall (judge features, against as many real training digits) and near-copies of the first n digits,
    beside the real test digits' (the floor); real: real_outputs(), if at hand. Returns (figures, what is pictured)."""
    digits = digits[:n]
    features = lambda x: judge_outputs(judge, to_float(x[:len(digits)]), device)[0]  # noqa: E731
    train, test = (real[1][0], real[0][0]) if real else (features(mnist.train_images), features(mnist.test_images))
    train, test, fake = train[:len(digits)], test[:len(digits)], features(digits)
    test_dist, test_idx = nearest_training(mnist.test_images[:len(digits)], mnist.train_images, device)
    dist, idx, share = near_copies(digits, mnist, test_dist, device)
    (p, r), (real_p, real_r) = precision_recall(train, fake, device), precision_recall(train, test, device)
    real_share = (test_dist < copy_threshold(test_dist)).float().mean().item()  # 1% by its definition
    figures = {"precision": p, "recall": r, "near_copies": share, "median_distance": dist.median().item(),
               "real_precision": real_p, "real_recall": real_r, "real_near_copies": real_share,
               "real_median_distance": test_dist.median().item()}
    return figures, (digits, dist, idx, test_dist, test_idx)


def real_outputs(judge, mnist, device):
    """judge_outputs of the 10,000 test digits and of the first 10,000 training digits."""
    return (judge_outputs(judge, to_float(mnist.test_images), device),
            judge_outputs(judge, to_float(mnist.train_images[:10000]), device))


def reference_stats(judge, mnist, device, real=None):
    """What FID compares with (the judge's statistics of the test digits); the floor: 10,000 training digits' scores."""
    (test_feats, _), train_outputs = real or real_outputs(judge, mnist, device)
    ref_stats = feature_stats(test_feats)
    return ref_stats, quality(*train_outputs, ref_stats)


def rng(seed):
    """A random stream of its own (never the training's): from an int seed, or the Generator given, continued."""
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)


def generate(G, n, noise_dim, device, seed, labels=None, noise=None, noise_std=1.0, batch=1000):
    """n images from G with noise from rng(seed), or `noise`; a conditional G draws `labels` (balanced if None)."""
    if G.n_classes and labels is None:
        labels = balanced_labels(n)
    gen, images = rng(seed), []
    with torch.no_grad():
        for i in range(0, n, batch):
            z = noise[i:i + batch] if noise is not None else noise_std * torch.randn(
                min(batch, n - i), noise_dim, 1, 1, generator=gen)
            images.append(G(z.to(device), labels[i:i + batch].to(device) if G.n_classes else None).float())
    return torch.cat(images)


def measure(G, cfg, judging, device):
    """quality() of G, the mean of EVAL_DRAWS draws of EVAL_SAMPLES digits: the one FID that training and `evaluate`
    print (its noise smaller by sqrt(EVAL_DRAWS)). Also returns the first draw's (images, judge features)."""
    asked = balanced_labels(cfg["eval_samples"]) if G.n_classes else None
    gen = rng(cfg["seed"] + SEED_OFFSET_EVAL)  # one stream for all draws: the first is the same every epoch
    draws, first = [], None
    for _ in range(cfg["eval_draws"]):
        fakes = generate(G, cfg["eval_samples"], cfg["noise_dim"], device, seed=gen, labels=asked)
        feats, probs = judge_outputs(judging.judge, fakes, device)
        first = first or (fakes, feats)
        draws.append(quality(feats, probs, judging.ref_stats, asked))
    return {k: float(np.mean([d[k] for d in draws])) for k in draws[0]}, first


def fid_seconds(G, cfg, judging, device):
    """About how long each epoch's FID takes, timed on 1,000 digits: on a GPU it is a large share of an epoch."""
    if not judging.every:
        return 0.0
    n = min(1000, cfg["eval_samples"])
    for k in (100, n):  # the first call pays for warming up (memory, kernels)
        start = time.time()
        judge_outputs(judging.judge, generate(G, k, cfg["noise_dim"], device, seed=0), device)
    return (time.time() - start) * cfg["eval_draws"] * cfg["eval_samples"] / n / judging.every


# -----------------------------------------------------------------------------
# 9. [files and safety] Files and pictures. Every checkpoint and image is written to a temporary name, then
# renamed: a crash or Ctrl-C mid-write never leaves a truncated file under the real name (os.replace is atomic).
def atomic_write(path, write, before_rename=None):
    """write(buffer) serializes into memory, then atomic_file writes the bytes: a full disk fails in one place."""
    buffer = io.BytesIO()
    write(buffer)
    with atomic_file(path, before_rename) as f:
        write_chunks(f, buffer.getbuffer())


@contextlib.contextmanager
def atomic_file(path, before_rename=None):
    """A file that is really name.tmp.ext, renamed to `path` at the block's end (before that, before_rename(tmp)); a
    write error: one line, exit 1; any other end removes it."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power cut cannot leave an empty file behind
        if before_rename:
            before_rename(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            die(f"could not write {path}: {e.strerror or e} (its previous version, if any, is intact)", 1)
        raise


def write_chunks(f, data, chunk=1 << 20):
    for i in range(0, len(data), chunk):
        f.write(data[i:i + chunk])


def atomic_save(obj, path):
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_training_state(path, gan, fixed_noise, state, cfg, given):
    """All --resume needs: weights, optimizers, TrainState, torch's random streams, settings and which were given."""
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    atomic_save({**{name: part.state_dict() for name, part in gan._asdict().items() if part is not None},
                 "fixed_noise": fixed_noise, "state": asdict(state), "rng": rng, "config": cfg,
                 "given": sorted(given)}, path)


def read_training_state(path):
    """last.ckpt (on the CPU), checked: it must be a training state saved by this version."""
    saved = load_checkpoint(path, "cpu")
    if not isinstance(saved, dict):
        die(f"{path}: not a training state saved by this script", 1)
    missing = [part for part in TRAINING_STATE_PARTS if part not in saved]
    if missing or not isinstance(saved["state"], dict) or (
            set(saved["state"]) != {f.name for f in TrainState.__dataclass_fields__.values()}):
        what = f"it lacks {', '.join(missing)}" if missing else "its TrainState differs"
        die(f"{path}: saved by another version of this script ({what}); start a new run in another "
            f"--output_dir, or resume with the version that wrote it", 1)
    return saved


TRAINING_STATE_PARTS = (*GAN._fields[:5], "fixed_noise", "state", "rng", "config", "given")  # float16: + scalers
FIXED_ON_RESUME = ("batch_size", "noise_dim", "ngf", "ndf", "seed", "conditional", "merge_test")  # what the saved
# weights and random streams mean: a resumed run cannot change them


def resume_settings(cfg, given, saved_cfg):
    """A resumed run keeps the saved settings but those given now (each printed); FIXED_ON_RESUME ones must match."""
    merged = {**cfg, **{k: v for k, v in saved_cfg.items() if k in cfg}}
    merged.update(output_dir=cfg["output_dir"], resume=True)  # where the run is now
    if "device" not in given and device_problem(merged["device"]):  # the device belongs to the machine
        print(f"device: {merged['device']!r} is not available on this machine; resuming with --device={cfg['device']}")
        merged["device"] = cfg["device"]
    for name in [k for k in cfg if k in given and merged[k] != cfg[k]]:
        if name in FIXED_ON_RESUME:
            die(f"{cfg['output_dir']}/last.ckpt was trained with --{name}={merged[name]!r}, not "
                f"{cfg[name]!r}; a resumed run keeps it (leave --{name} out)", 2)
        print(f"{name}: {merged[name]!r} -> {cfg[name]!r}")
        merged[name] = cfg[name]
    return merged


def restore_training_state(saved, gan, cfg):
    """Load a read_training_state() into the models; returns (TrainState, fixed noise). Optimizers take cfg's rates."""
    for name in [n for n in GAN._fields if getattr(gan, n) is not None and n in saved]:
        try:
            getattr(gan, name).load_state_dict(saved[name])
        except Exception as e:  # a part saved by another version: other shapes or keys
            die(f"{os.path.join(cfg['output_dir'], 'last.ckpt')}: its {name} does not fit this script "
                f"({str(e).splitlines()[0][:150]}); start a new run in another --output_dir", 1)
    for optimizer, lr in ((gan.D_optimizer, cfg["lr_d"]), (gan.G_optimizer, cfg["lr_g"])):
        for group in optimizer.param_groups:
            group["lr"], group["betas"] = lr, cfg["betas"]
    torch.set_rng_state(saved["rng"]["torch"].cpu())  # RNG states must be CPU tensors, whatever map_location did
    if saved["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in saved["rng"]["cuda"]])
    state = TrainState(**saved["state"])
    state.history.setdefault("seconds", [math.nan] * len(state.history["epoch"]))  # saved before metrics.csv
    return state, saved["fixed_noise"]


def load_checkpoint(path, device):
    """torch.load with weights_only=True (a foreign file cannot run code), onto `device`; problems: one line, exit 1."""
    if not os.path.isfile(path):
        die(f"{path}: no such checkpoint file", 1)
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles; we report in one line below
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        die(f"{path}: not a readable checkpoint (truncated or another format): {str(e).splitlines()[0][:200]}", 1)


def load_generator(path, noise_dim, device):
    """A G_model.ckpt-style state_dict; its first layer tells the G: noise_dim (+ 10 if conditional) in, ngf * 4 out."""
    state = load_checkpoint(path, device)
    shape = tuple(state.get("main.0.weight", torch.empty(0)).shape) if isinstance(state, dict) else ()
    conditional = shape[:1] == (noise_dim + N_CLASSES,)
    G = Generator(noise_dim, N_CLASSES if conditional else 0, shape[1] // 4 if len(shape) == 4 else NGF).to(device)
    if isinstance(state, dict) and {"G_ema", "state"} <= set(state):
        die(f"{path} is a training state (the last.ckpt that --resume reads), not a generator; pass the "
            f"G_model.ckpt beside it", 1)
    if isinstance(state, dict) and "main.8.weight" in state and "main.9.weight" not in state:  # D's last layer
        die(f"{path} is a discriminator (a D_model.ckpt), not a generator; pass the G_model.ckpt beside it", 1)
    try:
        G.load_state_dict(state)
    except Exception as e:  # torch's first line is a heading ("Error(s) in loading ..."); the details follow it
        details = " ".join(line.strip() for line in str(e).splitlines()[1:])[:200]
        die(f"{path} is not a Generator(noise_dim={noise_dim}) state_dict ({details or e})", 1)
    return G.eval()


def idx_file_problem(path):
    """What is wrong with an MNIST IDX file, or None: a big-endian header (magic 2051/2049, sizes), then the bytes."""
    is_images = "images" in os.path.basename(path)
    with open(path, "rb") as f:
        header = f.read(16 if is_images else 8)
    fields = [int.from_bytes(header[i:i + 4], "big") for i in range(0, len(header) - 3, 4)]
    magic = 2051 if is_images else 2049
    if len(fields) < (4 if is_images else 2) or fields[0] != magic:
        return f"wrong header (expected the IDX magic number {magic}, found {fields[0] if fields else 'nothing'})"
    expected = len(header) + math.prod(fields[1:])
    found = os.path.getsize(path)
    if found != expected:
        return f"wrong size (its header says {fields[1]:,} items: expected {expected:,} bytes, found {found:,})"
    return None


def idx_header(magic, shape):
    """The start of an IDX file, as MNIST's own files are: big-endian magic, each dimension; uint8 data follows."""
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)


def to_uint8(images):
    """float images in [-1, 1] -> uint8 (N, 28, 28) pixels, as in MNIST's files and PNGs."""
    return ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def grid_image(images, nrow=8, pad=2):
    """Images in [-1, 1] as one uint8 picture, nrow to a row, `pad` black pixels apart (torchvision's make_grid)."""
    digits, (h, w) = to_uint8(images.detach().cpu().float()).numpy(), images.shape[-2:]
    grid = np.zeros((math.ceil(len(digits) / nrow) * (h + pad) + pad, nrow * (w + pad) + pad), np.uint8)
    for i, digit in enumerate(digits):
        top, left = pad + i // nrow * (h + pad), pad + i % nrow * (w + pad)
        grid[top:top + h, left:left + w] = digit
    return grid


def save_grid(images, path, nrow=8):
    """A grid of images in [-1, 1] (8x8 by default)."""
    atomic_write(path, lambda f: f.write(cv2.imencode(".png", grid_image(images, nrow))[1].tobytes()))


def save_plots(history, fid_floor, path):
    """D and G loss and D(x), D(G(z)) per epoch; under them FID (with the real-data floor) when measured."""
    has_fid = not all(math.isnan(v) for v in history["fid"])
    fig, axes = plt.subplots(2 if has_fid else 1, 1, figsize=(8, 7 if has_fid else 4), squeeze=False)
    for key, label in (("d_loss", "D loss"), ("g_loss", "G loss"), ("d_x", "D(x)"), ("d_g_z", "D(G(z))")):
        axes[0, 0].plot(history["epoch"], history[key], label=label, ls="-" if "loss" in key else ":")
    if has_fid:
        ax = axes[1, 0]
        ax.plot(history["epoch"], history["fid"], "o-", label="FID (LeNet features) of G")
        if fid_floor is not None:  # None: this (resumed) run did not load the judge
            ax.axhline(fid_floor, color="gray", ls="--", label=f"real data floor ({fid_floor:.2f})")
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 40 rather than 4x10^1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    for ax in axes[:, 0]:
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def save_metrics(history, path):
    """metrics.csv, a row per trained epoch, rewritten from last.ckpt's history: a resume repeats or loses no row."""
    rows = [",".join(METRICS_COLUMNS)] + [
        ",".join("" if math.isnan(history[k][i]) else f"{history[k][i]:.6g}" for k in METRICS_COLUMNS)
        for i in range(len(history["epoch"]))]
    atomic_write(path, lambda f: f.write(("\n".join(rows) + "\n").encode()))


def save_progress_gif(grid_paths, path):
    frames = [Image.open(p) for p in grid_paths if os.path.exists(p)]
    if frames:
        atomic_write(path, lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                                    duration=400, loop=0))


def save_real_vs_fake(real, fake, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, images, title in ((axes[0], real, "real MNIST"), (axes[1], fake, "generated")):
        ax.imshow(grid_image(images[:64]), cmap="gray")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def save_pngs(images, folder, labels=None, first=0):
    """Each image as a 28x28 grayscale NNNNNN.png (from `first`); with labels in ImageFolder's <digit>/ folders."""
    for i, img in enumerate(to_uint8(images).numpy(), start=first):
        sub = os.path.join(folder, str(int(labels[i - first]))) if labels is not None else folder
        os.makedirs(sub, exist_ok=True)
        atomic_write(os.path.join(sub, f"{i:06d}.png"), lambda f: f.write(cv2.imencode(".png", img)[1].tobytes()))


def slerp(a, b, t):
    """Spherical interpolation: it keeps to the shell where Gaussian noise lives (a straight line cuts inside it)."""
    omega = torch.acos((a / a.norm() * b / b.norm()).sum().clamp(-1, 1))
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def save_interpolation(G, noise_dim, device, seed, path, rows=10, steps=10):
    """Row r walks from noise r to noise r + 1 (a conditional G also from digit r to digit r + 1, labels blended)."""
    ends = torch.randn(rows + 1, noise_dim, generator=torch.Generator().manual_seed(seed))
    ts = torch.linspace(0, 1, steps)
    z = torch.stack([slerp(ends[r], ends[r + 1], t) for r in range(rows) for t in ts]).view(-1, noise_dim, 1, 1)
    one_hot, k = torch.eye(N_CLASSES), N_CLASSES  # labels: an unconditional G ignores them
    y = torch.stack([(1 - t) * one_hot[r % k] + t * one_hot[(r + 1) % k] for r in range(rows) for t in ts])
    save_grid(generate(G, len(z), noise_dim, device, 0, y, noise=z), path, nrow=steps)


# -----------------------------------------------------------------------------
# 10. [using G] Sampling (load the generator like any plain state_dict), evaluation and the fake dataset
CHUNK = 10000  # `dataset` and `sample --png_dir` draw and write this many digits at a time (bounded memory)
MANIFEST = "written_by_dcgan_mnist.json"  # in a fake set's raw/ folder: the sha256 of each file `dataset` wrote


def grid_size(conditional):
    """Progress grids are 8x8; a conditional G's are 10x10, row r = digit r."""
    return N_CLASSES if conditional else 8


def balanced_labels(n, device="cpu", start=0):
    """0, 1, ..., 9, 0, 1, ...: each digit n/10 times (+-1). start: the labels from position start on."""
    return (torch.arange(start, start + n) % N_CLASSES).to(device)


def draw_fixed(G, fixed_noise):
    """The progress grid's images: the fixed noise, and for a conditional G the digits row by row."""
    n = len(fixed_noise)
    labels = torch.arange(n) // grid_size(True) if G.n_classes else None
    return generate(G, n, fixed_noise.shape[1], next(G.parameters()).device, seed=0, labels=labels, noise=fixed_noise)


def sample(cfg, opts):
    """fake_grid.png (8x8; a conditional G's 10x10, row r = digit r; 8x8 of one --digit); if asked PNGs and a walk."""
    device = pick_device(cfg["device"])
    G = load_generator(opts["ckpt"], cfg["noise_dim"], device)
    digit, nd = opts["digit"], cfg["noise_dim"]
    if digit is not None and not G.n_classes:
        die(f"--digit needs a conditional generator; {opts['ckpt']} is unconditional (--conditional=True makes one)", 2)
    k = grid_size(G.n_classes and digit is None)
    labels = torch.arange(k * k) // k if digit is None else torch.full((k * k,), digit)  # row r = digit r, or --digit
    grid_path = os.path.join(cfg["output_dir"], "fake_grid.png")
    save_grid(generate(G, k * k, nd, device, cfg["seed"] + SEED_OFFSET_GRID, labels), grid_path, nrow=k)
    print(f"Wrote {grid_path}")
    if opts["interpolate"]:
        path = os.path.join(cfg["output_dir"], "interpolation.png")
        save_interpolation(G, nd, device, cfg["seed"] + SEED_OFFSET_GRID, path)
        print(f"Wrote {path}")
    if opts["png_dir"]:
        n, gen = opts["n"], rng(cfg["seed"] + SEED_OFFSET_PNGS)
        for start in range(0, n, CHUNK):  # CHUNK images at a time: memory does not grow with --n
            k = min(CHUNK, n - start)
            labels = (torch.full((k,), digit) if digit is not None else balanced_labels(k, start=start)
                      ) if G.n_classes else None
            save_pngs(generate(G, k, nd, device, gen, labels), opts["png_dir"], labels, first=start)
        layout = "<digit>/NNNNNN.png" if G.n_classes else "NNNNNN.png"
        print(f"Wrote {n} PNGs (28x28 grayscale) to {opts['png_dir']}/{layout}")


def labeled_fakes(G, n, cfg, device, seed, builders=(None, None)):
    """n generated digits (uint8) and their labels, drawn as `dataset` draws them (labeled_fake_chunks)."""
    images, labels = zip(*labeled_fake_chunks(G, n, cfg, device, seed, builders))
    return torch.cat(images), torch.cat(labels)


def labeled_fake_chunks(G, n, cfg, device, seed, builders=(None, None), tally=None):
    """n digits (uint8) and labels, CHUNK at a time from one stream: a conditional G's as asked (balanced, shuffled), an
    unconditional G's as the judge reads them; noise std DATASET_NOISE; DATASET_FILTER: judge_filter; DATASET_CENTER."""
    (judge, builder), gen = builders, rng(seed)
    centred = center_digits if cfg["dataset_center"] else (lambda digits: digits)  # as MNIST's digits are
    min_p, agree, std = cfg["dataset_filter"], builder_agree(G, cfg), cfg["dataset_noise"]
    for start in range(0, n, CHUNK):
        k = min(CHUNK, n - start)
        if not G.n_classes:
            images = generate(G, k, cfg["noise_dim"], device, gen, noise_std=std)
            yield centred(to_uint8(images)), torch.from_numpy(judge_outputs(judge, images, device)[1].argmax(1))
            continue
        draws = 3 * k if min_p else k
        asked = balanced_labels(draws)[torch.randperm(draws, generator=gen)]
        images = generate(G, draws, cfg["noise_dim"], device, gen, asked, noise_std=std)
        if min_p:
            second = class_probs(builder, images, device) if agree else None
            keep = judge_filter(judge_outputs(judge, images, device)[1], asked, k, gen, min_p, second, agree, tally)
            images, asked = images[keep], asked[keep]
        yield centred(to_uint8(images)), asked


def center_digits(digits):
    """uint8 digits (N, 28, 28), each moved so that its centre of mass falls on (14, 14), as MNIST's (LeCun et al.)."""
    x, coords = digits.float(), torch.arange(28.0)
    mass = x.sum((1, 2)).clamp(min=1)  # a blank image stays where it is
    dy = ((x.sum(2) @ coords) / mass - 14).round().long().clamp(-7, 7)
    dx = ((x.sum(1) @ coords) / mass - 14).round().long().clamp(-7, 7)
    return shift_images(digits, dy, dx, 7, 0)


def read_as_asked(probs, asked, min_p):
    """Which digits a builder (class probabilities `probs`) reads as the digit asked for, with p >= min_p."""
    probs = torch.as_tensor(probs)
    return (probs.argmax(1) == asked) & (probs[torch.arange(len(asked)), asked] >= min_p)


def judge_filter(probs, asked, n, seed, min_p=0.5, second=None, agree=0.0, tally=None):
    """Indices of n drawn digits, each digit n/10 times (+-1): at random among those the judge (p >= min_p) and the
    second builder (p >= agree) read as asked; if too few pass, the likeliest. tally: drawn, turned away, unpassed."""
    p_asked = torch.from_numpy(probs)[torch.arange(len(asked)), asked]
    judge_ok = read_as_asked(probs, asked, min_p)
    second_ok = read_as_asked(second, asked, agree) if second is not None else torch.ones_like(judge_ok)
    passed = judge_ok & second_ok
    gen = rng(seed)
    order = torch.rand(len(asked), generator=gen)
    rank = torch.where(passed, 1 + order, p_asked)  # passed digits (>= 1) before the others (< 1)
    wanted = torch.bincount(balanced_labels(n), minlength=N_CLASSES)
    keep = torch.cat([torch.nonzero(asked == d).flatten()[rank[asked == d].argsort(descending=True)[:wanted[d]]]
                      for d in range(N_CLASSES)])
    if tally is not None:
        tally.update(drawn=len(asked), judge=int((~judge_ok).sum()), resnet=int((~second_ok).sum()),
                     short=int((~passed[keep]).sum()))
    return keep[torch.randperm(n, generator=gen)]


def write_dataset(cfg, opts):
    """A labeled fake MNIST (MNIST's four files) in <dataset_dir>/MNIST/raw/, never over real data (see below)."""
    raw = os.path.join(opts["dataset_dir"], "MNIST", "raw")
    check_dataset_target(raw, cfg["data_dir"], opts["dataset_dir"], opts["overwrite"])
    device = pick_device(cfg["device"])
    G = load_generator(opts["ckpt"], cfg["noise_dim"], device)
    present = [os.path.isfile(os.path.join(os.path.expanduser(cfg["data_dir"]), "MNIST", "raw", f)) for f in RAW_FILES]
    mnist = load_mnist(cfg["data_dir"]) if opts["measure"] and all(present) else None  # to measure it (no download)
    builders = get_builders(G, cfg, device)  # (the judge, the second builder), where needed
    os.makedirs(raw, exist_ok=True)
    tally = Counter()
    for split, n, offset in (("train", opts["n"], 0), ("t10k", opts["n_test"], 1)):
        chunks = labeled_fake_chunks(G, n, cfg, device, cfg["seed"] + SEED_OFFSET_DATASET + offset, builders, tally)
        write_idx_split(raw, split, n, with_progress(chunks, n, f"{split} digits", tally))
    print(f"Wrote {opts['n']:,} training and {opts['n_test']:,} test digits to {raw}/ ({dataset_source(G, cfg)}). "
          f"Load with torchvision.datasets.MNIST({opts['dataset_dir']!r}) or --data_dir={opts['dataset_dir']}")
    if tally["drawn"]:
        print(turned_away(tally))
    k = min(opts["n"], opts["measure"])  # the set's digits to measure (0: none)
    if k and mnist is None:
        print(f"(precision, recall and near-copies not measured: MNIST is not in {cfg['data_dir']})")
    elif 0 < k <= 3:
        print("(precision, recall and near-copies not measured: they need more than 3 digits)")
    elif k:
        record_fidelity(raw, k, mnist, builders[0] or load_shipped("judge", device), device)


def record_fidelity(raw, k, mnist, judge, device):
    """fidelity() of the set's first k training digits, read back from the file: into MANIFEST, and one line."""
    digits = np.fromfile(os.path.join(raw, "train-images-idx3-ubyte"), np.uint8, count=k * 784, offset=16)
    f = fidelity(torch.from_numpy(digits).view(k, 28, 28), mnist, judge, device)[0]
    record_written(raw, {}, fidelity={"digits": k, **f})
    print(f"Its first {k:,} training digits: precision {f['precision']:.1%}, recall {f['recall']:.1%}, near-copies "
          f"{f['near_copies']:.1%}, median distance {f['median_distance']:.2f} (real test digits: "
          f"{f['real_precision']:.1%}, {f['real_recall']:.1%}, {f['real_near_copies']:.1%}, "
          f"{f['real_median_distance']:.2f}; see {MANIFEST})")


def with_progress(chunks, n, desc, tally):
    """The chunks, passed on, with a progress bar over the digits written and the share of drawn digits kept."""
    drawn_before = tally["drawn"]  # the tally runs on over both splits
    with tqdm(total=n, desc=desc, unit=" digits", disable=None) as bar:
        for images, labels in chunks:
            bar.update(len(labels))
            if tally["drawn"] > drawn_before:
                bar.set_postfix_str(f"kept {bar.n / (tally['drawn'] - drawn_before):.0%} of those drawn")
            yield images, labels


def turned_away(tally):
    """One line: how many of the digits drawn each builder turned away (a digit can fail both)."""
    d = tally["drawn"]
    line = f"Of {d:,} digits drawn, the judge turned away {tally['judge']:,} ({tally['judge'] / d:.0%})"
    line += f", the ResNet {tally['resnet']:,} ({tally['resnet'] / d:.0%})" if tally["resnet"] else ""
    if tally["short"]:
        line += f"; {tally['short']:,} digits kept did not pass (too few of their digit did: a weak G; train it longer)"
    return line


def write_idx_split(raw, split, n, chunks):
    """One split's two IDX files, the images streamed; each file's sha256 into MANIFEST before it takes its name."""
    images_name, labels_name, labels = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte", []
    def record(name):  # what atomic_file runs on the complete temporary file, before it takes its name
        return lambda tmp: record_written(raw, {name: file_sha256(tmp)})
    with atomic_file(os.path.join(raw, images_name), record(images_name)) as f:
        f.write(idx_header(2051, (n, 28, 28)))
        for images, y in chunks:
            write_chunks(f, images.numpy().tobytes())
            labels.append(y)
    data = idx_header(2049, (n,)) + torch.cat(labels).to(torch.uint8).numpy().tobytes()
    atomic_write(os.path.join(raw, labels_name), lambda f: f.write(data), record(labels_name))


def record_written(raw, digests, **measured):
    """Add these files' sha256 to MANIFEST (and what `dataset` measured of the set, once it is written)."""
    atomic_write(os.path.join(raw, MANIFEST), lambda f: f.write(json.dumps(
        {"files": {**read_manifest(raw), **digests}, **measured}, indent=1).encode()))


def read_manifest(raw):
    """{file name: sha256} of the files `dataset` wrote into raw/ ({} if none)."""
    try:
        with open(os.path.join(raw, MANIFEST)) as f:
            files = json.load(f)["files"]
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_dataset_target(raw, data_dir, dataset_dir, overwrite):
    """`dataset` writes neither where --data_dir reads nor over MNIST files it did not write, but with --overwrite."""
    data_raw = os.path.join(os.path.expanduser(data_dir), "MNIST", "raw")
    if os.path.realpath(raw) == os.path.realpath(data_raw):
        die(f"--dataset_dir={dataset_dir} is the folder this run reads MNIST from (--data_dir={data_dir}); "
            f"write the fake set to another folder", 2)
    written = read_manifest(raw)
    foreign = [f for f in RAW_FILES if os.path.isfile(os.path.join(raw, f))
               and written.get(f) != file_sha256(os.path.join(raw, f))]
    if foreign and not overwrite:
        die(f"{raw} holds MNIST files that `dataset` did not write ({', '.join(foreign)}); choose another "
            f"--dataset_dir, or pass --overwrite=True to replace them", 2)


def builder_agree(G, cfg):
    """DATASET_AGREE where it applies: a conditional G's set, filtered by the judge."""
    return cfg["dataset_agree"] if G.n_classes and cfg["dataset_filter"] else 0.0


def get_builders(G, cfg, device, judge=None):
    """(the judge, the ResNet): the shipped classifiers that build G's set, each where needed (else None)."""
    needs_judge = not G.n_classes or cfg["dataset_filter"]  # for the labels, or for the filter
    builder = load_shipped("resnet", device) if builder_agree(G, cfg) else None
    return ((judge or load_shipped("judge", device)) if needs_judge else None), builder


def dataset_source(G, cfg):
    """Where a set's digits and labels come from, in words."""
    centred = ", centred like MNIST's" if cfg["dataset_center"] else ""
    if not G.n_classes:
        return "labels: the judge's reading of each digit" + centred
    min_p, agree = cfg["dataset_filter"], builder_agree(G, cfg)
    kept = f", kept where the judge reads them (p >= {min_p:g})" if min_p else ""
    kept += f" and a ResNet agrees (p >= {agree:g})" if agree else ""
    return "labels: the digits G was asked for" + kept + centred


def fid_by_digit(feats, labels, ref_feats, ref_labels):
    """Each digit's FID against the real test images of that digit: which digit lacks its variety."""
    return [frechet_distance(*feature_stats(feats[labels == d]), *feature_stats(ref_feats[ref_labels == d]))
            for d in range(N_CLASSES)]


def print_by_digit(title, rows, fmt):
    print(f"{title:<44} " + " ".join(f"{d:>6}" for d in range(N_CLASSES)))
    for name, values in rows:
        print(f"{name:<44} " + " ".join(f"{v:{fmt}}" for v in values))


def evaluate(cfg, opts):
    """FID, score and digit coverage of a generator; fidelity, diversity and near-copies; train-on-fake accuracy."""
    device = pick_device(cfg["device"])
    G = load_generator(opts["ckpt"], cfg["noise_dim"], device)
    mnist = load_mnist(cfg["data_dir"])
    judge = load_shipped("judge", device)
    real = real_outputs(judge, mnist, device)
    judging = Judging(1, "fid", judge, *reference_stats(judge, mnist, device, real))
    metrics, (fakes, feats) = measure(G, cfg, judging, device)  # training's FID: the same draws, the same mean
    n, asked = cfg["eval_samples"], balanced_labels(cfg["eval_samples"]) if G.n_classes else None
    floor = f"real: {min(10000, len(mnist.train_images)):,} training images"  # a slice or a fake set: its own counts
    rows = [(f"{opts['ckpt']} (mean of {cfg['eval_draws']} draws of {n:,}, as in training)", metrics),
            (floor, judging.floor)]
    head = f"images vs the {len(mnist.test_images):,} test digits"
    print(f"{head:<44} {'FID':>8} {'score':>6} {'rarest digit':>13} {'commonest':>10}"
          f" {'confidence':>11}" + (f" {'labels':>8}" if G.n_classes else ""))
    for name, m in rows:
        print(f"{name:<44} {m['fid']:8.2f} {m['score']:6.2f} {m['min_share']:13.1%} {m['max_share']:10.1%}"
              f" {m['confidence']:11.2%}" + ("" if math.isnan(m["label_accuracy"]) else f" {m['label_accuracy']:8.2%}"))
    if G.n_classes:  # variety within each digit: the fakes asked for d against the real test d's
        (test_feats, _), (real_feats, _) = real
        def by_digit(feats, labels):
            return fid_by_digit(feats, labels.numpy(), test_feats, mnist.test_labels.numpy())
        print_by_digit("FID per digit (vs that digit's test images)", [
            ("generated", by_digit(feats, asked)), (floor, by_digit(real_feats, mnist.train_labels[:10000]))], "6.1f")
    picture = os.path.join(cfg["output_dir"], "nearest_neighbours.png")
    report_fidelity(to_uint8(fakes), asked, mnist, judge, device, real, picture)
    if opts["n_train"]:
        report_train_on_fake(G, cfg, opts["n_train"], mnist, device, judge)


def report_fidelity(digits, asked, mnist, judge, device, real, path):
    """precision, recall, near-copies beside real test digits' (by digit: conditional G); `path`: the nearest digits."""
    f, (digits, dist, idx, test_dist, test_idx) = fidelity(digits, mnist, judge, device, real=real)
    print(f"{f'vs {len(digits):,} real training digits':<44} {'precision':>9} {'recall':>7} {'near-copies':>12} "
          f"{'median distance':>16}")
    for name, key in (("generated", ""), (f"real: {len(digits):,} test digits", "real_")):
        print(f"{name:<44} {f[key + 'precision']:9.1%} {f[key + 'recall']:7.1%} {f[key + 'near_copies']:12.1%} "
              f"{f[key + 'median_distance']:16.2f}")
    print("(precision: share of digits like real ones; recall: share of real digits G draws (judge features, k = 3); "
          "near-copies: share closer to a training digit, in pixels, than 99% of test digits: ~1% if G copies none)")
    if asked is not None:  # simple shapes (ones) come closest, for real digits too: their row is the floor
        threshold, labels = copy_threshold(test_dist), (asked[:len(digits)], mnist.test_labels[:len(digits)])
        print_by_digit("near-copies per digit (%)", [(name, [100 * (d[y == k] < threshold).float().mean().item()
                                                            for k in range(N_CLASSES)]) for name, d, y in (
            ("generated", dist, labels[0]), (f"real: {len(digits):,} test digits", test_dist, labels[1]))], "6.1f")
    closest, closest_test = dist.argsort()[:12], test_dist.argsort()[:12]
    everything = torch.cat([mnist.train_images, mnist.test_images])
    rows = [digits[closest], everything[idx[closest]], mnist.test_images[closest_test],
            mnist.train_images[test_idx[closest_test]]]
    save_grid(to_float(center_digits(torch.cat(rows))), path, nrow=12)
    print(f"Wrote {path} (rows: the generated digits closest to a training digit, those; the same for test digits)")



def report_train_on_fake(G, cfg, n_train, mnist, device, judge=None):
    """Each outside reader (READERS) trained on n_train digits drawn as `dataset` draws, tested on the real test digits
    beside the same reader trained on real ones; how that one reads the generated; which digits each misreads."""
    images, labels = labeled_fakes(G, n_train, cfg, device, cfg["seed"] + SEED_OFFSET_DATASET,
                                   get_builders(G, cfg, device, judge))
    print(f"train on {n_train:,} generated digits ({dataset_source(G, cfg)}, noise std {cfg['dataset_noise']:g}), "
          f"test on the 10,000 real test digits; each reader had no part in building the set")
    print(f"{'reader':<10} {'trained on real':>15} {'on generated':>13} {'gap':>7} "
          f"{'reads the generated as labeled':>31}")
    misread = []
    for name in READERS:
        on_real = get_reader(cfg["cache_dir"], mnist, device, name)
        on_fake = train_reader(name, images, labels, device)
        fake_misread, real_misread = (misread_by_digit(c, mnist.test_images, mnist.test_labels, device)
                                      for c in (on_fake, on_real))
        fake_acc, real_acc = (1 - sum(m) / len(mnist.test_labels) for m in (fake_misread, real_misread))
        agree = judge_accuracy(on_real, images, labels, device)
        print(f"{name:<10} {real_acc:15.2%} {fake_acc:13.2%} {100 * (fake_acc - real_acc):+7.2f} {agree:31.2%}")
        misread += [(f"{name} trained on generated digits", fake_misread),
                    (f"{name} trained on real digits", real_misread)]
    print("(gap: points of real test accuracy lost by training on generated digits instead of real ones)")
    print_by_digit("real test digits read wrong, per digit", misread, "6d")


# -----------------------------------------------------------------------------
# 11. [command line] Command line: --name=value overrides a constant above, parsed with that constant's type
def die(message, code):
    """One clear line on stderr and an exit code, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def kernel_argv(argv):
    """Whether argv is a notebook kernel's own (launcher, -f <connection file>): a pasted cell parses none of it."""
    return "kernel" in os.path.basename(argv[0]) or len(argv) > 2 and argv[1] == "-f" and argv[2].endswith(".json")


def resume_command(argv):
    """The command line that continues this run: its options, any --resume (--resume true too) dropped, one last."""
    script, args = ("dcgan_mnist.py", []) if kernel_argv(argv) else (os.path.basename(argv[0]), argv[1:])
    drop = {i for i, a in enumerate(args) if re.fullmatch(r"--resume(=.*)?", a)}
    drop |= {i + 1 for i in drop if args[i] == "--resume" and args[i + 1:i + 2] and args[i + 1].lower() in BOOLS}
    return shlex.join(["python", script or "dcgan_mnist.py", *[a for i, a in enumerate(args) if i not in drop],
                       "--resume=True"])


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line and exit 2 (no usage first), naming the closest valid option."""
    def error(self, message):
        names = [o for a in self._actions for o in a.option_strings]
        unknown = re.findall(r"(--?[\w-]+)", message.partition("unrecognized arguments:")[2])
        close = [([n for n in names if n.startswith(u)] or difflib.get_close_matches(u, names, 1, 0.6) or [""])[0]
                 for u in unknown]  # what it abbreviates, or the nearest spelling
        close = [c for c in close if c]
        die(message + (f" (did you mean {', '.join(close)}?)" if close else ""), 2)


BOOLS = {"true": True, "1": True, "false": False, "0": False}  # what a bool option takes


def option_type(default, low=None, high=None):
    """An option's type: its default's (bool: True/False/1/0; tuple: as many numbers); whole numbers in [low, high]."""
    def parse(text):
        try:
            if isinstance(default, bool):
                return BOOLS[text.lower()]
            if isinstance(default, tuple):
                value = ast.literal_eval(text)
                assert isinstance(value, tuple) and len(value) == len(default) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                return tuple(float(v) for v in value)
            value = (int if default is None else type(default))(text)  # int("2.5") fails; float("3") is a fine float
            assert low is None or low <= value <= (math.inf if high is None else high)
            return value
        except (KeyError, ValueError, SyntaxError, AssertionError):
            kind = type(default).__name__ if low is None else f"whole number from {low} to {high or 'up'}"
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind} (default: {default!r})")
    return parse


def add_option(parser, name, meaning, default, low=None, high=None):
    """--name value or --name=value (a bool's bare --name: True). The namespace holds only what was given (SUPPRESS)."""
    switch = isinstance(default, bool)
    text = argparse.SUPPRESS if meaning is None else f"{meaning} (default: {default!r})".replace("%", "%%")  # % formats
    parser.add_argument(f"--{name}", type=option_type(default, low, high), nargs="?" if switch else None,
                        const=True if switch else None, help=text,
                        metavar="int" if default is None else type(default).__name__)


def parse_args(argv, extra=None, command="train"):
    """argv -> (config, names given, the command's own options); bad input exits 2. extra: COMMAND_OPTIONS[command]."""
    here = globals().get("__file__")  # none in a notebook cell: --help then lists the options without their comments
    source = open(here, encoding="utf-8").read() if here else ""
    prog = f"python {os.path.basename(here or 'dcgan_mnist.py')}" + ("" if command == "train" else f" {command}")
    epilog = (f"--conditional=True changes these defaults (CONDITIONAL_DEFAULTS): {CONDITIONAL_DEFAULTS}\n"
              f"On a CUDA GPU (compute capability 7.0+), after those (GPU_DEFAULTS): {GPU_DEFAULTS}")
    if command != "train":  # a command's --help: its own options; the hyperparameters are in the main --help
        epilog = ("The training hyperparameters apply too where they matter (--output_dir, --data_dir, --seed, "
                  "--device, ...): python dcgan_mnist.py --help lists them all.")
    parser = Parser(prog=prog, usage=f"{prog} [--name=value ...]", epilog=epilog, allow_abbrev=False,
                    description=__doc__ if command == "train" else inspect.getdoc(COMMANDS[command]),
                    argument_default=argparse.SUPPRESS,
                    formatter_class=functools.partial(argparse.RawDescriptionHelpFormatter, max_help_position=32,
                                                      width=118))
    for name, (spec, meaning) in (extra or {}).items():  # whole numbers: (default, smallest, largest or None)
        add_option(parser, name, meaning, *(spec if isinstance(spec, tuple) else (spec,)))
    for name in CONFIG_NAMES:  # each constant of section 1, with the comment written beside it
        comment = re.search(rf"^{name} = .*?#\s*(.*)$", source, re.M)
        add_option(parser, name.lower(), None if command != "train" else comment[1] if comment else "", globals()[name])
    told = vars(parser.parse_args(argv))
    cfg = {name.lower(): globals()[name] for name in CONFIG_NAMES}
    given = {k for k in told if k in cfg}
    cfg.update({k: told[k] for k in given})
    if cfg["conditional"]:  # the conditional GAN's own measured defaults, where the command line is silent
        cfg.update({k: v for k, v in CONDITIONAL_DEFAULTS.items() if k not in given})
    return cfg, given, {k: v for k, v in told.items() if k not in cfg}


def validate(cfg):
    """Check every setting before any work starts: one clear line and exit 2 for the first bad one."""
    def check(names, ok, why):
        for name in names.split():
            if not ok(cfg[name]):
                die(f"--{name}={cfg[name]!r} {why}", 2)
    check("batch_size noise_dim ngf ndf g_steps epochs early_stopping sample_every eval_draws", lambda v: v >= 1,
          "must be at least 1")
    check("lr_d lr_g dataset_noise", lambda v: 0 < v < math.inf, "must be a positive number")
    check("mode_seeking max_minutes max_batches eval_every", lambda v: 0 <= v < math.inf, "must be 0 (off) or more")
    check("ema_decay min_delta dataset_filter dataset_agree", lambda v: 0 <= v < 1, "must be in [0, 1) (0: off)")
    check("betas", lambda v: all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)")
    check("real_label", lambda v: 0 < v <= 1, "must be in (0, 1]")
    check("eval_samples", lambda v: v >= 100, "must be at least 100")
    check("select_by", lambda v: v in ("g_loss", "fid"), 'must be "g_loss" or "fid"')
    check("device", lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v), 'must be auto, cpu, cuda, cuda:N or mps')
    if device_problem(cfg["device"]):
        die(f"--device={cfg['device']} but {device_problem(cfg['device'])}", 2)


def device_problem(device):
    """Why `device` cannot be used on this machine, or None."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "CUDA is not available on this machine (try --device=cpu)"
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    if device == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine (try --device=cpu)"
    return None


def check_folder(option, folder, create=True):
    """`folder` made and writable before any work (create=False: what exists of its path a folder), else exit 2."""
    nearest = os.path.abspath(folder)
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    try:
        if not os.path.isdir(nearest):
            raise NotADirectoryError(errno.ENOTDIR, f"{nearest} is a file")
        if create:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, ".write_test")
            open(probe, "w").close()
            os.remove(probe)
    except OSError as e:
        die(f"--{option}={folder}: cannot write to this folder ({e.strerror or e})", 2)


@contextlib.contextmanager
def output_folder_lock(folder, command="train", option="output_dir"):
    """One run per folder: an OS lock on <folder>/<command>.lock (with the pid), dropped on any exit: never stale."""
    path = os.path.join(folder, f"{command}.lock")
    f = open(path, "a+")  # "a+": do not wipe the pid of a run that holds the lock
    try:
        if os.name == "nt":
            import msvcrt
            f.seek(1 << 20)  # lock a byte past the pid, so that the pid stays readable
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        die(f"{folder} is in use by another {command} run (pid {pid}); wait for it to end or use another --{option}", 2)


    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)  # while we still hold the lock
        f.close()


# The commands' own options: name -> (default, what it does). Whole numbers: (default, smallest, largest or None).
COMMAND_OPTIONS = {
    "train": {},
    "sample": {
        "ckpt": ("", "the generator to draw from ('': <output_dir>/G_model.ckpt)"),
        "digit": ((None, 0, N_CLASSES - 1), "conditional G: an 8x8 grid (and PNGs) of this digit only"),
        "interpolate": (False, "also write <output_dir>/interpolation.png, walks through the noise"),
        "png_dir": ("", "also write --n separate 28x28 PNGs here (conditional G: <png_dir>/<digit>/NNNNNN.png)"),
        "n": ((64, 1, None), "how many PNGs --png_dir gets")},
    "evaluate": {
        "ckpt": ("", "the generator to measure ('': <output_dir>/G_model.ckpt)"),
        "n_train": ((60000, 0, None), "train-on-fake: a classifier trained on this many generated digits (0 = skip)")},
    "dataset": {
        "dataset_dir": ("", "required: write the fake MNIST to <dataset_dir>/MNIST/raw/, MNIST's four files"),
        "n": ((60000, 1, None), "training digits"), "n_test": ((10000, 1, None), "test digits"),
        "ckpt": ("", "the generator to draw from ('': <output_dir>/G_model.ckpt)"),
        "overwrite": (False, "replace MNIST files in <dataset_dir> that `dataset` did not write itself"),
        "measure": ((10000, 0, None), "precision, recall and near-copies of this many of the set's digits (0: skip)")}}
COMMANDS = {"train": train, "sample": sample, "evaluate": evaluate, "dataset": write_dataset}  # docstring: --help


def command_options(command, options, cfg):
    """The command's own options, with their defaults where not given; folders checked before any work."""
    opts = {name: options.get(name, spec[0] if isinstance(spec, tuple) else spec)
            for name, (spec, _) in COMMAND_OPTIONS[command].items()}
    if "ckpt" in opts and not opts["ckpt"]:
        opts["ckpt"] = os.path.join(cfg["output_dir"], "G_model.ckpt")
    if command == "dataset" and not opts["dataset_dir"]:
        die("dataset needs --dataset_dir=<folder> (it writes <folder>/MNIST/raw/)", 2)
    for name in ("png_dir", "dataset_dir"):
        if opts.get(name):
            check_folder(name, opts[name])
    return opts


def main(argv):
    command, args = "train", argv
    if argv and not argv[0].startswith("-"):
        command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        die(f"unknown command {command!r}; use train (the default), sample, evaluate or dataset", 2)
    cfg, given, options = parse_args(args, COMMAND_OPTIONS[command], command)
    validate(cfg)
    device = pick_device(cfg["device"])  # a GPU's own defaults, where the command line is silent (GPU_DEFAULTS)
    cfg.update({k: v for k, v in machine_defaults(device.type, capability(device)).items() if k not in given})
    check_folder("output_dir", cfg["output_dir"])
    for option in ("cache_dir", "data_dir"):  # made only when needed (a reader to cache, a download)
        check_folder(option, os.path.expanduser(cfg[option]), create=False)
    if command == "train":
        last = os.path.join(cfg["output_dir"], "last.ckpt")
        if cfg["resume"] and not os.path.isfile(last):
            die(f"--resume=True but there is no {last} to resume from", 2)
        with output_folder_lock(cfg["output_dir"]):
            train(cfg, given)
        return
    opts = command_options(command, options, cfg)
    lock = output_folder_lock(opts["dataset_dir"], "dataset", "dataset_dir") if command == "dataset" else None
    try:
        with on_stop_signals(interrupt), lock or contextlib.nullcontext():
            COMMANDS[command](cfg, opts)
    except Interrupted as e:
        print(f"\nInterrupted: {command} stopped; no file is left half-written (run the same command again to "
              f"finish)", file=sys.stderr)
        sys.exit(128 + e.args[0])


if __name__ == "__main__":  # a terminal, %run or !python; or a notebook cell, with the constants above as edited
    main([] if kernel_argv(sys.argv) else sys.argv[1:])
