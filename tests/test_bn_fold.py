"""BatchNorm folding is exact in float: conv→BN equals the folded conv (pure torch)."""
import pytest
import torch
from torch import nn

from fqvit_det.convert.bn_fold import fold_batchnorm, fold_bn_into_conv


def _random_bn(channels, gen, affine=True):
    bn = nn.BatchNorm2d(channels, eps=1e-3, affine=affine)
    bn.running_mean.copy_(torch.randn(channels, generator=gen))
    bn.running_var.copy_(torch.rand(channels, generator=gen) * 2 + 0.1)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.randn(channels, generator=gen))
            bn.bias.copy_(torch.randn(channels, generator=gen))
    return bn.eval()


def _reference(conv, bn, x):
    """BN of the conv output from the definition: γ (y − μ) / √(σ² + ε) + β."""
    y = nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    shape = (1, -1, 1, 1)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    return ((y - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * gamma.view(shape) + beta.view(shape))


@pytest.mark.parametrize('groups,bias,affine', [(1, False, True), (1, True, True), (6, False, True),
                                                (6, True, False), (2, True, True)])
def test_fold_matches_conv_then_bn(groups, bias, affine, device):
    gen = torch.Generator().manual_seed(groups * 10 + bias)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=groups, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        if bias:
            conv.bias.copy_(torch.randn(6, generator=gen))
    bn = _random_bn(6, gen, affine)
    x = torch.randn(2, 6, 9, 7, generator=gen)
    conv, bn, x = conv.to(device), bn.to(device), x.to(device)
    ref = _reference(conv, bn, x)
    with torch.no_grad():
        fold_bn_into_conv(conv, bn)
        out = conv(x)
    assert conv.bias is not None and conv.bias.device == conv.weight.device
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


class ConvModuleLike(nn.Module):
    """The structure of mmcv's ConvModule (``conv``, ``norm_name``, ``order``), without mmcv."""

    def __init__(self, cin, cout, groups, gen):
        super().__init__()
        self.order = ('conv', 'norm', 'act')
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
        self.norm_name = 'bn'
        self.bn = _random_bn(cout, gen)
        self.act = nn.SiLU()

    @property
    def norm(self):
        return getattr(self, self.norm_name)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


def test_fold_batchnorm_walks_conv_modules_and_sequentials():
    gen = torch.Generator().manual_seed(0)
    seq_conv = nn.Conv2d(8, 4, 1)
    model = nn.Sequential(ConvModuleLike(3, 8, 1, gen), ConvModuleLike(8, 8, 8, gen),  # depthwise
                          nn.Sequential(seq_conv, _random_bn(4, gen), nn.ReLU())).eval()
    x = torch.randn(2, 3, 12, 10, generator=gen) * 50
    with torch.no_grad():
        ref = model(x)
        folded = fold_batchnorm(model)
        out = model(x)
    assert folded == ['0.bn', '1.bn', '2.1']
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_fold_refuses_bn_without_running_stats():
    conv = nn.Conv2d(2, 2, 1)
    bn = nn.BatchNorm2d(2, track_running_stats=False)
    with pytest.raises(ValueError, match='running statistics'):
        fold_bn_into_conv(conv, bn)
    # The model walk leaves such BNs alone.
    model = nn.Sequential(conv, bn)
    assert fold_batchnorm(model) == [] and isinstance(model[1], nn.BatchNorm2d)
