"""
Training speed: the original tutorial's loop against this project's, on the same device and batches.

    python benchmarks/bench_train.py --data_dir=../shared/data [--device=cpu] [--steps=10] [--rounds=6] [--no_amp]

Each round times `steps` iterations (D step + G step, batch 128) of (a) a faithful copy of the tutorial's
loop (per-sample PIL transforms in a DataLoader with num_workers=0, Sigmoid + BCELoss, no detach so the
D step back-propagates through G, a second fake batch for the G step) and then (b) ours (dcgan_mnist.py's
D_train / G_train / ema_update with its defaults), interleaved A B A B after one warm-up round of each,
so slow spells of a shared machine hit both alike. Prints median images/s, the ratio, and the share of
time spent getting batches. The last three lines are machine-readable.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torchvision
import torchvision.transforms as transforms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dcgan_mnist as dm  # noqa: E402

BATCH = 128


# ---- (a) the tutorial, as it was written (architecture shared; D ends in a Sigmoid) -----------------
def tutorial_setup(data_dir, device):
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    dataset = torch.utils.data.ConcatDataset(
        [torchvision.datasets.MNIST(data_dir, train=t, transform=transform, download=False) for t in (True, False)])
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=0)
    G = dm.Generator(100).to(device)
    D = nn.Sequential(dm.Discriminator(), nn.Sigmoid()).to(device)
    G_optimizer = torch.optim.Adam(G.parameters(), lr=1e-3)
    D_optimizer = torch.optim.Adam(D.parameters(), lr=1e-3)
    return loader, G, D, G_optimizer, D_optimizer


def tutorial_D_train(x, G, D, D_optimizer, criterion, device):
    D.zero_grad()
    x_real, y_real = x.view(-1, 1, 28, 28).to(device), torch.ones(BATCH, 1).to(device)
    D_real_loss = criterion(D(x_real).view(-1, 1), y_real)
    z = torch.randn(BATCH, 100, 1, 1).to(device)
    x_fake, y_fake = G(z), torch.zeros(BATCH, 1).to(device)
    D_fake_loss = criterion(D(x_fake).view(-1, 1), y_fake)  # not detached: backward runs through G too
    D_loss = D_real_loss + D_fake_loss
    D_loss.backward()
    D_optimizer.step()
    return D_loss.data.item()


def tutorial_G_train(G, D, G_optimizer, criterion, device):
    G.zero_grad()
    z = torch.randn(BATCH, 100, 1, 1).to(device)
    y = torch.ones(BATCH, 1).to(device)
    G_loss = criterion(D(G(z)).view(-1, 1), y)
    G_loss.backward()
    G_optimizer.step()
    return G_loss.data.item()


def run_tutorial(setup, steps, device):
    loader, G, D, G_optimizer, D_optimizer = setup
    criterion = nn.BCELoss()
    it, data_time = iter(loader), 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        x, _ = next(it)
        data_time += time.perf_counter() - t
        tutorial_D_train(x, G, D, D_optimizer, criterion, device)
        tutorial_G_train(G, D, G_optimizer, criterion, device)
    return time.perf_counter() - start, data_time  # .item() above already waited for the device


# ---- (b) this project's loop, with dcgan_mnist.py's defaults -----------------------------------------
def ours_setup(data_dir, device):
    cfg = {name.lower(): getattr(dm, name) for name in dm.CONFIG_NAMES}
    mnist = dm.load_mnist(data_dir)
    data = torch.cat([mnist.train_images, mnist.test_images]).to(device)
    return data, dm.build_models(cfg, device), cfg


def run_ours(setup, steps, device):
    data, (G, D, G_ema, G_optimizer, D_optimizer, G_scaler, D_scaler), cfg = setup
    amp = dm.precision(device, cfg["amp"])[0]
    perm = torch.randperm(len(data), device=device)
    loss_sum, data_time = torch.zeros((), device=device), 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        t = time.perf_counter()
        real = dm.to_float(data[perm[i * BATCH:(i + 1) * BATCH]])
        data_time += time.perf_counter() - t
        d_loss, fake, _, _ = dm.D_train(real, G, D, D_optimizer, 100, cfg["real_label"], amp, scaler=D_scaler)
        g_loss = dm.G_train(fake, D, G_optimizer, amp, scaler=G_scaler)
        dm.ema_update(G_ema, G, cfg["ema_decay"])
        loss_sum += d_loss + g_loss
    loss_sum.item()  # wait for the device, as the training loop does every 10 batches
    return time.perf_counter() - start, data_time


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=10, help="iterations per round and loop")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up round)")
    p.add_argument("--data_dir", default=dm.DATA_DIR)
    p.add_argument("--no_amp", action="store_true", help="ours in float32: what a CPU without native bf16 gets")
    args = p.parse_args()
    dm.AMP = dm.AMP and not args.no_amp
    device = dm.pick_device(args.device)
    torch.manual_seed(0)
    setups = {"tutorial": tutorial_setup(args.data_dir, device), "ours": ours_setup(args.data_dir, device)}
    runs = {"tutorial": run_tutorial, "ours": run_ours}
    speed = {k: [] for k in runs}
    data_share = {k: [] for k in runs}
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} batch={BATCH} "
          f"steps/round={args.steps} rounds={args.rounds}")
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, run in runs.items():
            seconds, data_seconds = run(setups[name], args.steps, device)
            if r > 0:
                speed[name].append(args.steps * BATCH / seconds)
                data_share[name].append(data_seconds / seconds)
        if r > 0:
            print(f"round {r}: tutorial {speed['tutorial'][-1]:.0f} img/s, ours {speed['ours'][-1]:.0f} img/s, "
                  f"ratio {speed['ours'][-1] / speed['tutorial'][-1]:.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in speed.items()}
    ratio = statistics.median(o / t for o, t in zip(speed["ours"], speed["tutorial"]))
    for k in runs:
        print(f"{k}: median {med[k]:.1f} img/s = {70000 / med[k]:.1f} s per 70,000-image epoch, "
              f"getting batches {statistics.median(data_share[k]):.1%} of the time")
    print(f"tutorial_img_per_s={med['tutorial']:.1f}")
    print(f"ours_img_per_s={med['ours']:.1f}")
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
