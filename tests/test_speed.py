"""Issue 5: the speed options change how a step runs, not what it computes (beyond float rounding)."""
import copy

import torch

from conftest import dm


def _run_steps(mnist, steps=3, channels_last=False, compile=False, amp=False):
    """`steps` D+G steps from seed 0 on the same batches with the same noise; returns (losses, G, D)."""
    torch.manual_seed(0)
    G, D = dm.Generator(100), dm.Discriminator()
    G.apply(dm.weights_init)
    D.apply(dm.weights_init)
    if channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G_opt = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    D_opt = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    G0 = copy.deepcopy(G)
    if compile:
        G.compile()
        D.compile()
    losses = []
    for i in range(steps):
        real = dm.to_float(mnist[0][i * 64:(i + 1) * 64])
        d_loss, fake = dm.D_train(real, G, D, D_opt, 100, amp=amp)
        losses += [float(d_loss), float(dm.G_train(fake, D, G_opt, amp=amp))]
    return torch.tensor(losses), G, D, G0


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_channels_last_and_compile_compute_the_same_steps(mnist):
    base_losses, G, D, _ = _run_steps(mnist)
    fast_losses, G_fast, D_fast, _ = _run_steps(mnist, channels_last=True, compile=True)
    torch.testing.assert_close(fast_losses, base_losses, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_flat(G_fast), _flat(G), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(_flat(D_fast), _flat(D), rtol=1e-4, atol=1e-6)
    # the plain state_dict keys survive compilation (no "_orig_mod." prefix)
    assert set(G_fast.state_dict()) == set(dm.Generator(100).state_dict())


def test_bf16_autocast_follows_the_float32_steps(mnist):
    """bf16 keeps about 3 significant digits: losses agree to ~1%, and the weights move the same way."""
    base_losses, G, D, G0 = _run_steps(mnist)
    bf16_losses, G_bf16, D_bf16, _ = _run_steps(mnist, channels_last=True, amp=True)
    torch.testing.assert_close(bf16_losses, base_losses, rtol=0.03, atol=0.01)
    step, step_bf16 = _flat(G) - _flat(G0), _flat(G_bf16) - _flat(G0)
    assert torch.nn.functional.cosine_similarity(step, step_bf16, dim=0) > 0.9
    assert all(p.dtype == torch.float32 for p in list(G_bf16.parameters()) + list(D_bf16.parameters()))
