"""Percentiles as torch.quantile computes them (linear interpolation), without its size limit."""
import pytest
import torch

from fqvit_det.quantizers.observers import quantile, quantiles, tail_quantiles

PROBS = [0.0, 1e-5, 1e-3, 0.1, 0.25, 0.5, 0.7, 0.9, 0.999, 0.9999, 0.99999, 1 - 1e-5, 1.0]


@pytest.mark.parametrize('n', [1, 2, 3, 7, 100, 300, 12800, 100003])
def test_per_tensor_bit_equal_to_torch_quantile(n, device):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(device)
    for p in PROBS:
        assert torch.equal(quantile(x, p), torch.quantile(x, p)), p
    got = quantiles(x, PROBS)
    for p, v in zip(PROBS, got):
        assert torch.equal(v, torch.quantile(x, p)), p


@pytest.mark.parametrize('shape', [(5, 300), (3, 4, 1000), (8, 1)])
def test_per_channel_bit_equal_to_torch_quantile(shape, device):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g)).to(device)
    for p in PROBS:
        assert torch.equal(quantile(x, p), torch.quantile(x, p, dim=-1)), p
    for p, (lo, hi) in zip((0.999, 0.9999), tail_quantiles(x, (0.999, 0.9999))):
        assert torch.equal(lo, torch.quantile(x, 1 - p, dim=-1))
        assert torch.equal(hi, torch.quantile(x, p, dim=-1))


def test_ties_and_float64():
    x = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 5.0], dtype=torch.float64)
    for p in PROBS:
        assert torch.equal(quantile(x, p), torch.quantile(x, p))


def test_beyond_torch_quantile_size_limit():
    """torch.quantile refuses more than 2^24 elements; the two order statistics and the
    interpolation still work. The 300 smallest / largest values are planted, so the order
    statistics around q·(n − 1) are known without sorting."""
    n = 2 ** 24 + 3
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, generator=g) + 10.0                     # bulk in [10, 11)
    low = torch.sort(torch.rand(300, generator=g)).values     # [0, 1)
    high = torch.sort(torch.rand(300, generator=g)).values + 20.0
    pos = torch.arange(600) * (n // 600)                      # distinct, spread out
    x[pos[:300]] = low
    x[pos[300:]] = high
    # (torch.quantile(x, p) raises "input tensor is too large" here, after seconds of work)
    for p in (1e-5, 0.99999):
        rank = torch.tensor(p, dtype=torch.float32) * (n - 1)
        below, above = int(rank), int(torch.ceil(rank))
        srt = (lambda k: low[k]) if p < 0.5 else (lambda k: high[k - (n - 300)])
        expected = torch.lerp(srt(below), srt(above), rank - below)
        assert torch.equal(quantile(x, p), expected)


def test_empty_input_raises():
    with pytest.raises(ValueError, match='empty'):
        quantile(torch.zeros(0), 0.5)
