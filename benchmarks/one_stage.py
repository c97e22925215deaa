"""
The one-stage step (Shen et al. 2021, "Training GANs in One Stage"; Polizzi & Tsai 2020, "FusedProp")
against the script's two steps: how much faster is it per step, and how close is its gradient for G?

    python benchmarks/one_stage.py --data_dir=../shared/data [--device=cpu] [--steps=10] [--rounds=6]

Two steps (dcgan_mnist.py): D_train runs D forward and backward on a real and a fake batch, then G_train
runs D forward and backward on the fake batch again, through to G. One stage: a single backward of D's
loss serves both players; on its way into G the gradient at each fake image is multiplied by
-exp(-logit), which turns the gradient of D's fake loss, log(1 + e^logit), into that of G's
non-saturating loss, log(1 + e^-logit). That is exact when D treats every image on its own; D's
BatchNorm mixes the images of a batch, so here it is an approximation: this script measures the cosine
similarity between the two gradients for G's weights at the same G and D (1 = the same direction).

Rounds of `steps` iterations, two steps then one stage, interleaved after one warm-up round of each, so
that slow spells of a shared machine hit both alike. Prints median images/s and the ratio; the last lines
are machine-readable.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dcgan_mnist as dm  # noqa: E402

BATCH = 128


def one_stage_losses(real, G, D, noise_dim, amp):
    """D's loss, with a hook that turns the gradient reaching G into the non-saturating G gradient."""
    z = torch.randn(real.shape[0], noise_dim, 1, 1, device=real.device)
    with dm.autocast(real.device.type, amp):
        fake = G(z)
        out_real, out_fake = D(real), D(fake)  # fake not detached: D's backward continues into G
        loss = (F.binary_cross_entropy_with_logits(out_real, torch.ones_like(out_real))
                + F.binary_cross_entropy_with_logits(out_fake, torch.zeros_like(out_fake)))
    # float32 and clamped: exp(-logit) overflows bf16 once D rejects a fake with a logit below about -88
    factor = -torch.exp(-out_fake.detach().float()).clamp(max=1e4).view(-1, 1, 1, 1)
    fake.register_hook(lambda grad: grad * factor.to(grad.dtype))
    return loss


def one_stage_step(real, G, D, G_optimizer, D_optimizer, noise_dim, amp):
    loss = one_stage_losses(real, G, D, noise_dim, amp)
    D_optimizer.zero_grad(set_to_none=True)
    G_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    D_optimizer.step()
    G_optimizer.step()
    return loss.detach()


def two_stage_step(real, G, D, G_optimizer, D_optimizer, noise_dim, amp):
    d_loss, fake, _, _ = dm.D_train(real, G, D, D_optimizer, noise_dim, 1.0, amp)
    return d_loss + dm.G_train(fake, D, G_optimizer, amp)


def gradient_agreement(real, G, D, noise_dim, amp, seed, mixing=True):
    """Cosine similarity of G's weight gradient: one stage's against the non-saturating loss's, same z.
    mixing=False: D's BatchNorm uses its running statistics (eval mode), so D treats each image on its own
    and the two must agree exactly (a check of the factor)."""
    grads = []
    for one_stage in (True, False):
        g, d = copy.deepcopy(G), copy.deepcopy(D).train(mixing)
        torch.manual_seed(seed)
        if one_stage:
            one_stage_losses(real, g, d, noise_dim, amp).backward()
        else:
            z = torch.randn(real.shape[0], noise_dim, 1, 1, device=real.device)
            with dm.autocast(real.device.type, amp):
                d(real)  # the same BatchNorm running-stat update as above (it does not change the output)
                out = d(g(z))
                F.binary_cross_entropy_with_logits(out, torch.ones_like(out)).backward()
        grads.append(torch.cat([p.grad.float().flatten() for p in g.parameters()]))
    return F.cosine_similarity(grads[0], grads[1], dim=0).item()


def run(step, setup, data, steps, amp):
    G, D, G_optimizer, D_optimizer = setup
    perm = torch.randperm(len(data), device=data.device)
    total = torch.zeros((), device=data.device)
    start = time.perf_counter()
    for i in range(steps):
        real = dm.to_float(data[perm[i * BATCH:(i + 1) * BATCH]])
        total += step(real, G, D, G_optimizer, D_optimizer, 100, amp)
    total.item()  # wait for the device
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=10, help="iterations per round and step kind")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up round)")
    p.add_argument("--data_dir", default=dm.DATA_DIR)
    args = p.parse_args()
    device = dm.pick_device(args.device)
    cfg = {name.lower(): getattr(dm, name) for name in dm.CONFIG_NAMES}
    amp = dm.precision(device, cfg["amp"])[0]
    mnist = dm.load_mnist(args.data_dir)
    data = torch.cat([mnist.train_images, mnist.test_images]).to(device)
    torch.manual_seed(0)
    setups = {}
    for name in ("two steps", "one stage"):
        gan = dm.build_models(cfg, device)
        setups[name] = (gan.G, gan.D, gan.G_optimizer, gan.D_optimizer)
    steps = {"two steps": two_stage_step, "one stage": one_stage_step}
    speed = {k: [] for k in steps}
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} bf16={amp} "
          f"batch={BATCH} steps/round={args.steps} rounds={args.rounds}")
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, step in steps.items():
            seconds = run(step, setups[name], data, args.steps, amp)
            if r > 0:
                speed[name].append(args.steps * BATCH / seconds)
        if r > 0:
            print(f"round {r}: two steps {speed['two steps'][-1]:.0f} img/s, one stage "
                  f"{speed['one stage'][-1]:.0f} img/s", flush=True)
    ratio = statistics.median(o / t for o, t in zip(speed["one stage"], speed["two steps"]))
    # gradient agreement on the trained two-step models (after the rounds above) and on fresh ones
    G, D = setups["two steps"][:2]
    real = dm.to_float(data[:BATCH])
    cosines = [gradient_agreement(real, G, D, 100, amp, seed) for seed in range(5)]
    fresh = dm.build_models(cfg, device)
    cosines_fresh = [gradient_agreement(real, fresh.G, fresh.D, 100, amp, seed) for seed in range(5)]
    exact = gradient_agreement(real, G, D, 100, amp, 0, mixing=False)
    for k in steps:
        print(f"{k}: median {statistics.median(speed[k]):.1f} img/s")
    print(f"ratio={ratio:.2f}")
    print(f"cosine_trained={statistics.median(cosines):.3f}")
    print(f"cosine_fresh={statistics.median(cosines_fresh):.3f}")
    print(f"cosine_without_batchnorm_mixing={exact:.4f}")


if __name__ == "__main__":
    main()
