"""Building blocks of MobileViTV2, laid out so their ``state_dict`` keys match timm's ``byobnet`` model.

Legend for shape comments: B batch, C channels, H/W height/width, P pixels per patch, N patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of ``divisor``, never more than 10 % below ``v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class ConvNormAct(nn.Module):
    """Conv (no bias) → BatchNorm → SiLU, keys ``conv.*`` and ``bn.*`` as timm's ConvNormAct."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, *, stride: int = 1, groups: int = 1,
                 apply_act: bool = True) -> None:
        super().__init__()
        padding = ((stride - 1) + (kernel_size - 1)) // 2
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.SiLU(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class InvertedResidual(nn.Module):
    """timm's BottleneckBlock with ``bottle_in=True, linear_out=True``: 1x1 expand, depthwise kxk, 1x1 project."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1, expand_ratio: float = 2.0) -> None:
        super().__init__()
        mid_chs = make_divisible(in_chs * expand_ratio)
        self.conv1_1x1 = ConvNormAct(in_chs, mid_chs, 1)
        self.conv2_kxk = ConvNormAct(mid_chs, mid_chs, 3, stride=stride, groups=mid_chs)
        self.conv3_1x1 = ConvNormAct(mid_chs, out_chs, 1, apply_act=False)
        # timm builds these blocks with downsample='': no shortcut at all when the shape changes.
        self.has_shortcut = in_chs == out_chs and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        return y + x if self.has_shortcut else y


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group: statistics over the whole [C, P, N] tensor of each image."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(1, num_channels, eps=eps)


class LinearSelfAttention(nn.Module):
    """Separable linear self-attention of MobileViTV2 (one context query, softmax over patches)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.qkv_proj = nn.Conv2d(embed_dim, 1 + 2 * embed_dim, kernel_size=1, bias=True)
        self.out_proj = nn.Conv2d(embed_dim, embed_dim, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [B, C, P, N] -> [B, 1 + 2C, P, N]
        query, key, value = qkv.split([1, self.embed_dim, self.embed_dim], dim=1)
        scores = F.softmax(query, dim=-1)  # over N
        context = (key * scores).sum(dim=-1, keepdim=True)  # [B, C, P, 1]
        return self.out_proj(F.relu(value) * context.expand_as(value))


class ConvMlp(nn.Module):
    """The dense transformer MLP: 1x1 conv, SiLU, 1x1 conv (per pixel)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, kernel_size=1, bias=True)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(hidden, dim, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LinearTransformerBlock(nn.Module):
    """Pre-norm transformer layer; its ``mlp`` is either the dense :class:`ConvMlp` or an MoE layer.

    An MoE ``mlp`` takes the pre-MLP embedding in two forms: ``z_hat`` normalised without affine (what
    experts receive, each applying its own affine) and ``z = norm2(x)`` (what the router reads).
    """

    def __init__(self, dim: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = GroupNorm1(dim)
        self.attn = LinearSelfAttention(dim)
        self.norm2 = GroupNorm1(dim)
        self.mlp: nn.Module = ConvMlp(dim, int(dim * mlp_ratio))

    @property
    def is_moe(self) -> bool:
        return not isinstance(self.mlp, ConvMlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if not self.is_moe:
            return x + self.mlp(self.norm2(x))
        z_hat = F.group_norm(x, 1, eps=self.norm2.eps)  # [B, C, P, N], no affine
        z = z_hat * self.norm2.weight[:, None, None] + self.norm2.bias[:, None, None]
        return x + self.mlp(z_hat, z)


class MobileVitV2Block(nn.Module):
    """Local conv → unfold to [B, C, P, N] → linear transformers → fold → 1x1 projection."""

    def __init__(self, in_chs: int, out_chs: int, *, transformer_dim: int, depth: int, patch_size: int = 2,
                 mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.conv_kxk = ConvNormAct(in_chs, in_chs, 3, groups=in_chs)
        self.conv_1x1 = nn.Conv2d(in_chs, transformer_dim, kernel_size=1, bias=False)
        self.transformer = nn.Sequential(*[LinearTransformerBlock(transformer_dim, mlp_ratio) for _ in range(depth)])
        self.norm = GroupNorm1(transformer_dim)
        self.conv_proj = ConvNormAct(transformer_dim, out_chs, 1, apply_act=False)
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        ph = pw = self.patch_size
        new_h, new_w = math.ceil(H / ph) * ph, math.ceil(W / pw) * pw
        nh, nw = new_h // ph, new_w // pw
        if (new_h, new_w) != (H, W):
            # timm resizes up to the patch grid (and keeps that size downstream)
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=True)
        x = self.conv_1x1(self.conv_kxk(x))
        C = x.shape[1]
        # [B, C, H, W] -> [B, C, ph, pw, nh, nw] -> [B, C, P, N]
        x = x.reshape(B, C, nh, ph, nw, pw).permute(0, 1, 3, 5, 2, 4).reshape(B, C, ph * pw, nh * nw)
        x = self.norm(self.transformer(x))
        # [B, C, P, N] -> [B, C, H, W]
        x = x.reshape(B, C, ph, pw, nh, nw).permute(0, 1, 4, 2, 5, 3).reshape(B, C, nh * ph, nw * pw)
        return self.conv_proj(x)
