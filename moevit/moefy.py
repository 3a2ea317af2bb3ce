"""MoEfication: experts built from hidden units of a dense transformer MLP (Zhang et al. 2021;
docs/architecture.md §Method).

The clustering that decides *which* units and centroids is in :mod:`moevit.convert`; this module only copies
weights and computes the correction term, so it can be checked exactly (E = 1, K = full width → dense model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moevit.layers import ConvMlp, LinearTransformerBlock
from moevit.moe.experts import ExpertBank


def dense_mlp_weights(mlp: ConvMlp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fc1 [H, C], b1 [H], fc2 [C, H], b2 [C] of a 1x1-conv MLP."""
    return (mlp.fc1.weight[:, :, 0, 0], mlp.fc1.bias, mlp.fc2.weight[:, :, 0, 0], mlp.fc2.bias)


def dense_mlp_apply(mlp: ConvMlp, z_TC: torch.Tensor) -> torch.Tensor:
    """The dense MLP on embeddings [T, C] (already through norm2 with its affine)."""
    w1, b1, w2, b2 = dense_mlp_weights(mlp)
    return F.linear(F.silu(F.linear(z_TC, w1, b1)), w2, b2)


def unit_importance(mlp: ConvMlp, z_TC: torch.Tensor) -> torch.Tensor:
    """Importance of each hidden unit on tokens z [T, C]: mean |act(W1 z + b1)_h| × ‖W2[:, h]‖ -> [H]."""
    w1, b1, w2, _ = dense_mlp_weights(mlp)
    act = F.silu(F.linear(z_TC, w1, b1)).abs().mean(dim=0)
    return act * w2.norm(dim=0)


@torch.no_grad()
def load_expert(bank: ExpertBank, expert: int, block: LinearTransformerBlock, dense: ConvMlp,
                units: torch.Tensor, *, centroid: torch.Tensor | None = None, correction: str = "residual") -> None:
    """Make ``expert`` of ``bank`` the sub-MLP of ``dense`` on hidden ``units`` [K].

    ``centroid`` μ_e (an embedding after norm2, unscaled) sets the correction term: ``residual`` stores
    v_e = MLP(μ_e) − sub_e(μ_e) with α_e = 1 (exact at the centroid), ``paper`` stores v_e = MLP(μ_e) with α_e = 0.
    Without a centroid the correction is zero.
    """
    i = bank.slot(expert)
    w1, b1, w2, b2 = dense_mlp_weights(dense)
    if units.numel() != bank.hidden:
        raise ValueError(f"expert {expert}: got {units.numel()} hidden units, the bank holds K={bank.hidden}")
    bank.norm_weight[i].copy_(block.norm2.weight)
    bank.norm_bias[i].copy_(block.norm2.bias)
    bank.fc1_weight[i].copy_(w1[units])
    bank.fc1_bias[i].copy_(b1[units])
    bank.fc2_weight[i].copy_(w2[:, units])
    bank.fc2_bias[i].copy_(b2)
    if centroid is None:
        bank.correction[i].zero_()
        bank.alpha[i].fill_(1.0 if correction == "residual" else 0.0)
        return
    mu = centroid.reshape(1, -1)
    full = dense_mlp_apply(dense, mu)[0]
    if correction == "residual":
        sub = F.linear(F.silu(F.linear(mu, w1[units], b1[units])), w2[:, units], b2)[0]
        bank.correction[i].copy_(full - sub)
        bank.alpha[i].fill_(1.0)
    elif correction == "paper":
        bank.correction[i].copy_(full)
        bank.alpha[i].fill_(0.0)
    else:
        raise ValueError(f"correction must be 'residual' or 'paper', got {correction!r}")


def moe_skeleton(dense: torch.nn.Module, moe_config) -> torch.nn.Module:
    """An MoE model with every weight of ``dense`` except the MLPs of ``moe_config.layers``, which become
    freshly initialised MoE layers for the conversion to fill."""
    from dataclasses import replace

    from moevit.mobilevitv2 import build_model

    model = build_model(replace(dense.config, moe=moe_config))
    own = model.state_dict()
    shared = {k: v for k, v in dense.state_dict().items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in shared and ".mlp." not in k]
    if missing:
        raise ValueError(f"dense model lacks weights the MoE model needs: {missing[:3]}")
    model.load_state_dict(shared, strict=False)
    return model


UNIT_SPLITS = ("overlap-topk", "disjoint-balanced")


@torch.no_grad()
def balanced_neuron_groups(mlp: ConvMlp, groups: int, *, seed: int = 0, iters: int = 12) -> list[torch.Tensor]:
    """MoEfication's split (Zhang et al. 2021): the H hidden units of ``mlp`` partitioned into ``groups`` disjoint
    groups of equal size H / groups by balanced k-means over their normalised input weight vectors W1[h].

    Balanced assignment: each centroid is offered H / groups slots and units are matched to slots by the Hungarian
    algorithm on cosine distance (scipy), then centroids are re-estimated; a few rounds suffice.
    """
    from scipy.optimize import linear_sum_assignment

    w1 = F.normalize(dense_mlp_weights(mlp)[0].float(), dim=1)  # [H, C]
    h = w1.shape[0]
    if groups < 1 or h % groups:
        raise ValueError(f"a disjoint split needs the MLP width {h} to be a multiple of the expert count {groups}")
    per = h // groups
    gen = torch.Generator().manual_seed(seed)
    centroids = w1[torch.randperm(h, generator=gen)[:groups]].clone()
    assign = torch.zeros(h, dtype=torch.long)
    for _ in range(iters):
        cost = (1.0 - w1 @ centroids.T).repeat_interleave(per, dim=1)  # [H, H]: unit x slot
        rows, cols = linear_sum_assignment(cost.numpy())
        new = torch.empty(h, dtype=torch.long)
        new[torch.from_numpy(rows)] = torch.from_numpy(cols // per)
        if torch.equal(new, assign):
            break
        assign = new
        centroids = F.normalize(torch.stack([w1[assign == g].mean(dim=0) for g in range(groups)]), dim=1)
    return [torch.nonzero(assign == g).flatten() for g in range(groups)]
