"""Pin the flow-matching conventions of docs/conventions.md numerically."""

import math

import pytest
import torch

from dit4dit import flow


def test_interpolation_endpoints_and_midpoint():
    x0 = torch.tensor([[1.0, -2.0]])
    z = torch.tensor([[3.0, 4.0]])
    assert torch.equal(flow.interpolate(x0, z, torch.tensor([0.0])), x0)  # tau = 0 is data
    assert torch.equal(flow.interpolate(x0, z, torch.tensor([1.0])), z)  # tau = 1 is noise
    torch.testing.assert_close(flow.interpolate(x0, z, torch.tensor([0.25])), torch.tensor([[1.5, -0.5]]))


def test_target_velocity_is_noise_minus_data():
    x0, z = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    torch.testing.assert_close(flow.target_velocity(x0, z), torch.tensor([-0.5, -3.0]))
    # d/dtau of the path equals the target
    tau = torch.tensor([0.3])
    eps = 1e-3
    num = (flow.interpolate(x0[None], z[None], tau + eps) - flow.interpolate(x0[None], z[None], tau)) / eps
    torch.testing.assert_close(num[0], flow.target_velocity(x0, z), rtol=1e-3, atol=1e-3)


def test_per_frame_tau_broadcast():
    x0 = torch.zeros(2, 1, 3, 1, 1)
    z = torch.ones(2, 1, 3, 1, 1)
    tau = torch.tensor([0.1, 0.2, 0.3]).view(1, 1, 3, 1, 1).expand(2, 1, 3, 1, 1)
    out = flow.interpolate(x0, z, tau)
    torch.testing.assert_close(out[0, 0, :, 0, 0], torch.tensor([0.1, 0.2, 0.3]))


def test_euler_with_exact_velocity_recovers_data():
    # With the true velocity of the straight path, Euler is exact in any number of steps.
    x0 = torch.tensor([[0.3, -0.7, 1.2]])
    z = torch.tensor([[1.0, 0.5, -0.4]])
    for n in (1, 4, 10):
        out = flow.euler_sample(lambda x, tau: z - x0, z, n)
        torch.testing.assert_close(out, x0)


def test_euler_direction_and_schedule():
    seen = []
    flow.euler_sample(lambda x, tau: seen.append(float(tau[0])) or torch.zeros_like(x), torch.zeros(2, 1), 4)
    assert seen == [1.0, 0.75, 0.5, 0.25]  # from noise (1) toward data (0)
    assert flow.euler_schedule(2) == [1.0, 0.5, 0.0]
    # one step of x <- x - dtau * v
    out = flow.euler_sample(lambda x, tau: torch.ones_like(x), torch.zeros(1, 1), 2)
    torch.testing.assert_close(out, torch.tensor([[-1.0]]))
    with pytest.raises(ValueError):
        flow.euler_schedule(0)


def test_tau_v_uniform():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_tau_v(200_000, generator=g)
    assert t.min() >= 0 and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.005
    assert abs(t.var().item() - 1 / 12) < 0.002


def test_tau_f_fixed_and_buckets():
    assert torch.equal(flow.sample_tau_f(3, 0.995), torch.full((3,), 0.995))
    g = torch.Generator().manual_seed(0)
    t = flow.sample_tau_f(50_000, 0.995, buckets=4, generator=g)
    values = sorted(set(t.tolist()))
    assert values == [0.0, 0.25, 0.5, 0.75, 1.0]  # {0/T, ..., T/T}
    counts = torch.stack([(t == v).float().mean() for v in values])
    assert torch.all((counts - 0.2).abs() < 0.01)


def test_tau_a_beta_1p5_1_over_0p999():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_tau_a(400_000, 1.5, 1.0, 0.999, generator=g)
    assert t.min() >= 0 and t.max() <= 1
    # s ~ Beta(1.5, 1): mean 0.6, var = a b / ((a+b)^2 (a+b+1)) = 1.5 / (6.25 * 3.5)
    s = t * 0.999
    assert abs(s.mean().item() - 0.6) < 0.002
    assert abs(s.var().item() - 1.5 / (6.25 * 3.5)) < 0.002
    # CDF of Beta(1.5, 1) is x^1.5: mass near the noisy end
    for x in (0.25, 0.5, 0.9):
        assert abs((s <= x).float().mean().item() - x ** 1.5) < 0.003
    # the same generator seed reproduces the draws
    a = flow.sample_tau_a(5, generator=torch.Generator().manual_seed(3))
    b = flow.sample_tau_a(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_beta_sampler_small_shape():
    g = torch.Generator().manual_seed(1)
    s = flow.sample_tau_a(200_000, 0.5, 0.5, 1.0, generator=g)
    assert abs(s.mean().item() - 0.5) < 0.005
    assert abs(s.var().item() - 0.125) < 0.003  # Beta(.5,.5) variance = 1/8


def test_masked_mse_ignores_padding():
    pred = torch.tensor([[1.0, 100.0], [3.0, -50.0]])
    target = torch.zeros(2, 2)
    mask = torch.tensor([[True, False], [True, False]])
    assert math.isclose(flow.masked_mse(pred, target, mask).item(), (1 + 9) / 2)
    assert math.isclose(flow.masked_mse(pred, target).item(), (1 + 1e4 + 9 + 2500) / 4)
