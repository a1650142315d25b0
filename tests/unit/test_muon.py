"""model.muon.Muon: torch's Muon step, with the Newton–Schulz iteration in float32 off CUDA."""

import copy

import torch

from model.muon import Muon, orthogonalize

COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults (Keller Jordan's quintic)


def matrices() -> list[torch.nn.Parameter]:
    """A tall, a wide and a square matrix, with gradients: both of the iteration's orientations."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((48, 16), (16, 40), (24, 24))]
    for param in params:
        param.grad = torch.randn_like(param)
    return params


def run(optimizer_type, params, steps: int = 3, **settings) -> list[torch.Tensor]:
    """`steps` updates of `params` (each with a fresh gradient drawn from a fixed stream)."""
    optimizer = optimizer_type(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", **settings)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
    return [param.detach().clone() for param in params]


def test_in_bf16_it_is_torchs_muon_bit_for_bit():
    params = matrices()
    ours = run(Muon, copy.deepcopy(params), ns_dtype=torch.bfloat16)
    torchs = run(torch.optim.Muon, copy.deepcopy(params))
    assert all(torch.equal(a, b) for a, b in zip(ours, torchs))


def test_off_cuda_it_orthogonalizes_in_float32_and_stays_within_bf16_rounding_of_torchs():
    params = matrices()
    ours = run(Muon, copy.deepcopy(params))  # CPU parameters: float32 iteration
    torchs = run(torch.optim.Muon, copy.deepcopy(params))
    for a, b, start in zip(ours, torchs, params):
        moved = (a - start.detach()).abs().max()
        assert not torch.equal(a, b)  # a different iteration dtype for the same update: the three steps
        # moved weights by up to 0.03 (measured 0.028-0.037), and the two runs differ by bf16's rounding
        # of those moves (2^-8 relative, measured 4e-4 at most): a wrong update would be 0.03 away.
        assert moved > 0.02
        torch.testing.assert_close(a, b, rtol=0, atol=moved / 40)


def test_the_iteration_is_the_quintic_computed_in_float64():
    """Against the polynomial written out in float64 on the transposed (wide) matrix."""
    torch.manual_seed(0)
    update = torch.randn(40, 12)
    x = update.double().T
    x = x / x.norm()
    a, b, c = COEFFICIENTS
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    result = orthogonalize(update, COEFFICIENTS, 5, 1e-7)
    assert result.dtype == torch.float32 and result.shape == update.shape
    torch.testing.assert_close(result.double(), x.T, rtol=0, atol=1e-5)
    singular = torch.linalg.svdvals(result.double())
    assert singular.min() > 0.5 and singular.max() < 1.5  # near-orthogonal, as the quintic promises


def test_its_state_is_torchs_so_either_loads_the_others_checkpoint():
    params = matrices()
    ours = Muon(params, lr=0.02)
    ours.step()
    theirs = torch.optim.Muon(copy.deepcopy(params), lr=0.02)
    theirs.load_state_dict(ours.state_dict())
    assert set(theirs.state_dict()["state"][0]) == {"momentum_buffer"}
