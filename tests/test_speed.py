"""Issue 5: the speed options change how a step runs, not what it computes (beyond float rounding)."""
import copy

import numpy as np
import torch

from conftest import dm


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _run_steps(mnist, steps=3, channels_last=False, amp=None, batch=64):
    """`steps` D+G steps from seed 0 on the same batches with the same noise.
    Returns (losses, [flat G+D weights before and after each step])."""
    torch.manual_seed(0)
    G, D = dm.Generator(100), dm.Discriminator()
    G.apply(dm.weights_init)
    D.apply(dm.weights_init)
    if channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G_opt = torch.optim.Adam(G.parameters(), lr=LR, betas=(0.5, 0.999))
    D_opt = torch.optim.Adam(D.parameters(), lr=LR, betas=(0.5, 0.999))
    losses, weights = [], [torch.cat([_flat(G), _flat(D)])]
    for i in range(steps):
        real = dm.to_float(mnist[0][i * batch:(i + 1) * batch])
        d_loss, fake, _, _ = dm.D_train(real, G, D, D_opt, 100, amp=amp)
        losses += [float(d_loss), float(dm.G_train(fake, D, G_opt, amp=amp))]
        weights.append(torch.cat([_flat(G), _flat(D)]))
    return torch.tensor(losses), weights


LR = 2e-4


def _assert_same_steps(mnist, **options):
    base_losses, base_w = _run_steps(mnist)
    fast_losses, fast_w = _run_steps(mnist, **options)
    torch.testing.assert_close(fast_losses[:2], base_losses[:2], rtol=1e-4, atol=1e-5)  # first step
    torch.testing.assert_close(fast_losses, base_losses, rtol=2e-3, atol=1e-4)  # three steps
    # After one Adam step every weight moved by lr * m / sqrt(v) = lr * sign(gradient): identical, except
    # where a gradient is ~0 and rounding flips its sign (a difference of at most 2 * lr, in few places).
    diff = (fast_w[1] - base_w[1]).abs()
    assert diff.max() <= 2 * LR + 1e-6
    assert (diff > 1e-6).float().mean() < 0.005
    assert torch.equal(fast_w[0], base_w[0])  # same initial weights


def test_channels_last_computes_the_same_steps(mnist):
    _assert_same_steps(mnist, channels_last=True)


def test_bf16_autocast_follows_the_float32_steps(mnist):
    """bf16 keeps about 3 significant digits: losses agree to ~1%, and the weights move the same way.
    Small (2 steps of 32): a CPU without bf16 units emulates it, 20x slower than float32."""
    base_losses, base_w = _run_steps(mnist, steps=2, batch=32)
    bf16_losses, bf16_w = _run_steps(mnist, steps=2, channels_last=True, amp=torch.bfloat16, batch=32)
    torch.testing.assert_close(bf16_losses, base_losses, rtol=0.03, atol=0.01)
    step, step_bf16 = base_w[-1] - base_w[0], bf16_w[-1] - bf16_w[0]
    assert torch.nn.functional.cosine_similarity(step, step_bf16, dim=0) > 0.9


def test_the_judge_scores_in_channels_last_with_the_same_outputs(judge, mnist):
    """load_shipped hands the judge over in channels_last on CPU (it scores 1.8x faster so); its features
    and probabilities, hence FID and label accuracy, are those of the plain layout up to float rounding."""
    conv = judge.features[3].weight  # (64, 32, 5, 5)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    plain = copy.deepcopy(judge).to(memory_format=torch.contiguous_format)
    assert plain.features[3].weight.is_contiguous()
    x = dm.to_float(mnist.test_images[:500])
    for fast, slow in zip(dm.judge_outputs(judge, x, torch.device("cpu")),
                          dm.judge_outputs(plain, x, torch.device("cpu"))):
        np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
