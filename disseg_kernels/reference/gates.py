"""The attention gates in plain PyTorch, line by line against ``shared/spec/attention.md``.

Every function takes x (B, C, H, W) and the module's weights as tensors, and computes the
eager formula: each step is a full-size PyTorch op (this is what the fused path is
measured against). Pooled maxima use ``adaptive_max_pool2d`` / ``torch.max(dim=1)``, whose
gradient goes to one arg-max (the fused kernels pick the first, in index order).
σ is the logistic sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .telu import telu_reference


def channel_attention_gate(x: torch.Tensor, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor) -> torch.Tensor:
    """g = σ(MLP(avg_HW x) + MLP(max_HW x)), MLP = 1×1 conv → ReLU → 1×1 conv (no bias); (B, C, 1, 1)."""
    a = F.adaptive_avg_pool2d(x, 1)
    m = F.adaptive_max_pool2d(x, 1)

    def mlp(t):
        return F.conv2d(F.relu(F.conv2d(t, fc1_weight)), fc2_weight)

    return torch.sigmoid(mlp(a) + mlp(m))


def channel_attention_reference(x, fc1_weight, fc2_weight):
    """x · g[b, c] (the decoders' channel attention)."""
    return x * channel_attention_gate(x, fc1_weight, fc2_weight)


def spatial_attention_gate(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None = None):
    """s = σ(conv_k([mean_C x, max_C x])), padding k//2; (B, 1, H, W)."""
    mean = torch.mean(x, dim=1, keepdim=True)
    mx, _ = torch.max(x, dim=1, keepdim=True)
    k = conv_weight.shape[-1]
    return torch.sigmoid(F.conv2d(torch.cat([mean, mx], dim=1), conv_weight, conv_bias, padding=k // 2))


def spatial_attention_reference(x, conv_weight):
    """x · s[b, h, w] (the decoders' spatial attention, no bias)."""
    return x * spatial_attention_gate(x, conv_weight)


def cbam_reference(x, mlp0_weight, mlp0_bias, mlp2_weight, mlp2_bias, conv_weight, conv_bias):
    """CBAM: g = σ(MLP(avg) + MLP(max)) with MLP = Linear → TeLU → Linear (biases); then
    s from mean_C and max_C of x·g with a k×k 2→1 conv (bias); out = (x·g)·s."""
    b, c = x.shape[:2]
    a = F.adaptive_avg_pool2d(x, 1).view(b, c)
    m = F.adaptive_max_pool2d(x, 1).view(b, c)

    def mlp(t):
        return F.linear(telu_reference(F.linear(t, mlp0_weight, mlp0_bias)), mlp2_weight, mlp2_bias)

    g = torch.sigmoid(mlp(a) + mlp(m)).view(b, c, 1, 1)
    xg = x * g
    return xg * spatial_attention_gate(xg, conv_weight, conv_bias)


def elat_composite_stencil(dconv_weights, dconv_biases, fuse_weight, fuse_bias):
    """Fold the three dilated 3×3 C→1 convs (dilation = padding = 1, 2, 3) and the 1×1
    3→1 fuse into one 7×7 C→1 conv (padding 3): weight (1, C, 7, 7), bias (1,).

    The taps of dilation d sit at rows/cols 3−d, 3, 3+d of the 7×7 grid, scaled by the
    fuse weight of that branch (25 distinct taps: the centre is shared). Differentiable in
    every input, so autograd reaches the module's own parameters.
    """
    fw = fuse_weight.reshape(-1)
    w0 = dconv_weights[0]
    w7 = w0.new_zeros(1, w0.shape[1], 7, 7)
    for i, (w, d) in enumerate(zip(dconv_weights, (1, 2, 3))):
        part = w0.new_zeros(1, w0.shape[1], 7, 7)
        part[:, :, 3 - d : 4 + d : d, 3 - d : 4 + d : d] = w * fw[i]
        w7 = w7 + part
    bias = (torch.stack([b.reshape(()) for b in dconv_biases]) * fw).sum() + fuse_bias.reshape(())
    return w7, bias.reshape(1)


def elat_reference(x, mlp0_weight, mlp2_weight, dconv_weights, dconv_biases, fuse_weight, fuse_bias):
    """ELAT: g = σ(Linear → TeLU → Linear (no biases) of avg_HW x) (B, C);
    s = σ(fuse_1×1([conv3×3_{d=1} x, conv3×3_{d=2} x, conv3×3_{d=3} x])) (B, H, W);
    out = x · g[b, c] · s[b, h, w]. The eager formula: three convs, a cat and the fuse."""
    b, c = x.shape[:2]
    a = F.adaptive_avg_pool2d(x, 1).view(b, c)
    g = torch.sigmoid(F.linear(telu_reference(F.linear(a, mlp0_weight)), mlp2_weight)).view(b, c, 1, 1)
    branches = [F.conv2d(x, w, bb, padding=d, dilation=d) for w, bb, d in zip(dconv_weights, dconv_biases, (1, 2, 3))]
    s = torch.sigmoid(F.conv2d(torch.cat(branches, dim=1), fuse_weight, fuse_bias))
    return x * g * s


def cbat_gates_reference(x, ca, sa, cbam):
    """The CBAT decoder's gate chain: channel attention → spatial attention → CBAM.

    ``ca`` = (fc1_weight, fc2_weight), ``sa`` = (conv_weight,), ``cbam`` = the seven
    tensors of :func:`cbam_reference`.
    """
    x = channel_attention_reference(x, *ca)
    x = spatial_attention_reference(x, *sa)
    return cbam_reference(x, *cbam)
