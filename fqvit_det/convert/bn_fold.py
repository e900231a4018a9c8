"""Fold inference-mode BatchNorm into the convolution that feeds it (pure torch).

Deployment flows (TensorRT, onnxruntime, TFLite) execute conv→BN as one convolution with
``w' = w·γ/√(σ²+ε)`` per output channel and ``b' = β + (b − μ)·γ/√(σ²+ε)``, so the quantized
weight is ``w'``, not ``w``: quantizing ``w`` and keeping BN in float would measure a model nobody
deploys. Folding is exact in real arithmetic; in float32 it changes outputs by rounding only.

Pairs are found structurally, without importing mmcv/mmdet:

* a module with a ``conv`` child and a ``norm_name`` attribute naming its BN child, whose ``order``
  runs conv directly before norm (mmcv ``ConvModule``, used by YOLOX, FPN-with-BN, RetinaNet ...);
* a module with ``conv<i>`` children and ``norm<i>_name`` attributes (mmdet ResNet stems and
  blocks: ``conv1 → norm1``);
* consecutive ``Conv2d, BatchNorm2d`` children of an ``nn.Sequential``.

The BN is replaced by ``nn.Identity`` and the convolution gains a bias. Only BNs that use running
statistics (``track_running_stats``) are folded; the model must be evaluated in eval mode.
"""
from typing import List, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def fold_bn_into_conv(conv: nn.Conv2d, bn: _BatchNorm) -> None:
    """Rewrite ``conv``'s weight and bias in place so that ``conv(x) == bn(conv_old(x))`` in eval."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError('cannot fold a BatchNorm without running statistics (track_running_stats=False)')
    if bn.num_features != conv.out_channels:
        raise ValueError(f'BatchNorm has {bn.num_features} features, conv has {conv.out_channels} '
                         'output channels')
    w = conv.weight.detach()
    dtype = w.dtype
    # Compute in float64 so the fold adds no error beyond the final float32 rounding.
    inv_std = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(inv_std)
    scale = gamma * inv_std
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    new_w = (w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(dtype)
    new_b = (beta + (bias - bn.running_mean.detach().double()) * scale).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(new_w)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_b, requires_grad=conv.weight.requires_grad)
    else:
        with torch.no_grad():
            conv.bias.copy_(new_b)


def _foldable(conv, bn) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm)
            and bn.track_running_stats and bn.running_mean is not None)


def _pairs(model: nn.Module) -> List[Tuple[nn.Module, str, str]]:
    """(parent, conv attribute, bn attribute) of every foldable conv→BN pair."""
    pairs = []
    for parent in model.modules():
        children = dict(parent.named_children())
        # mmcv ConvModule: conv → norm adjacent in ``order``.
        norm_name = getattr(parent, 'norm_name', None)
        order = tuple(getattr(parent, 'order', ()) or ())
        if (isinstance(norm_name, str) and 'conv' in children and norm_name in children
                and 'conv' in order and 'norm' in order
                and order.index('norm') == order.index('conv') + 1):
            if _foldable(children['conv'], children[norm_name]):
                pairs.append((parent, 'conv', norm_name))
            continue
        # mmdet ResNet stem / blocks: conv<i> → norm<i>.
        for i in range(1, 4):
            name = getattr(parent, f'norm{i}_name', None)
            if isinstance(name, str) and f'conv{i}' in children and name in children \
                    and _foldable(children[f'conv{i}'], children[name]):
                pairs.append((parent, f'conv{i}', name))
        if isinstance(parent, nn.Sequential):
            names = list(children)
            for a, b in zip(names, names[1:]):
                if _foldable(children[a], children[b]):
                    pairs.append((parent, a, b))
    return pairs


def fold_batchnorm(model: nn.Module) -> List[str]:
    """Fold every recognised conv→BN pair of ``model`` in place; returns the folded BN paths."""
    paths = {id(m): p for p, m in model.named_modules()}
    folded = []
    for parent, conv_name, bn_name in _pairs(model):
        bn = getattr(parent, bn_name)
        fold_bn_into_conv(getattr(parent, conv_name), bn)
        setattr(parent, bn_name, nn.Identity())
        prefix = paths[id(parent)]
        folded.append(f'{prefix}.{bn_name}' if prefix else bn_name)
    return folded
