"""The camera side of an MoE MobileViTV2 cut into segments at its dispatch points.

A model with M MoE layers is M + 1 pure tensor programs (what ONNX export needs) joined by M dispatch points:

    segment 0:      image [B, 3, H, W]                -> h, x_TPC, expert_idx_TK, gates_TK, probs_TE
    segment 1..M-1: h_in, y_TPC (the previous mix)    -> h, x_TPC, expert_idx_TK, gates_TK, probs_TE
    segment M:      h, y_TPC                          -> logits [B, classes]

``h`` is the residual stream [B, C, P, N] of the transformer layer whose MLP is the MoE layer (after its
attention), ``x_TPC`` the normalised patch tokens the experts take, and the routing comes from the layer's own
router (:meth:`moevit.moe.MoELayer.route`) inside the segment. Between segments, :meth:`MoELayer.mix` runs the
layer's dispatcher (in-process or the coordinator's remote one), so the segments know nothing of where experts
run. :meth:`CameraProgram.forward` chains the torch segments and gives exactly ``model(x)`` (same ops in the same
order); :mod:`moevit.onnx_camera` runs the same segments on onnxruntime.

The unfold/fold of a MobileViTV2 block needs its patch grid, which depends on the image size: the grid is taken
from the input as it passes (a plain Python int, so an exported segment has it as a constant; export is per size).
Legend: B batch, C channels, P pixels per patch, N patches, T = B*N tokens, K top-k, E experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moevit.layers import LinearTransformerBlock, MobileVitV2Block
from moevit.mobilevitv2 import MobileViTV2
from moevit.moe.layer import MoELayer

__all__ = ["CameraProgram", "Segment", "DISPATCH_OUTPUTS"]

#: names of a segment's outputs at a dispatch point (the last segment outputs ``logits``)
DISPATCH_OUTPUTS = ("h", "x_TPC", "expert_idx_TK", "gates_TK", "probs_TE")


class _Grid:
    """The patch grid of one MobileViTV2 block, set by its unfold and read by its fold (maybe in a later segment)."""

    def __init__(self) -> None:
        self.nh = self.nw = 0


def _unfold(x: torch.Tensor, p: int, nh: int, nw: int) -> torch.Tensor:
    """[B, C, nh*p, nw*p] -> [B, C, p*p, nh*nw]: pixel (i, j) of patch (h, w) at [.., i*p + j, h*nw + w]."""
    B, C = x.shape[:2]
    return x.reshape(B, C, nh, p, nw, p).permute(0, 1, 3, 5, 2, 4).reshape(B, C, p * p, nh * nw)


def _fold(x: torch.Tensor, p: int, nh: int, nw: int) -> torch.Tensor:
    """The inverse of :func:`_unfold`: [B, C, p*p, nh*nw] -> [B, C, nh*p, nw*p]."""
    B, C = x.shape[:2]
    return x.reshape(B, C, p, p, nh, nw).permute(0, 1, 4, 2, 5, 3).reshape(B, C, nh * p, nw * p)


# The unfold and fold as ONNX writes them. Exported as written they are 6-d Transposes, which onnxruntime moves
# element by element: 0.4-1.9 ms each at 256 px, about an eighth of the camera side. SpaceToDepth + a 4-d
# Transpose and DepthToSpace (CRD) move the same elements 3-6 times faster (bench/profile_onnx_camera.py). The
# torch forward stays the reshape/permute above; the graphs are checked against it to 1e-4.
class _UnfoldExport(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: int, C: int, N: int) -> torch.Tensor:  # noqa: N803
        B, _, H, W = x.shape
        return _unfold(x, p, H // p, W // p)

    @staticmethod
    def symbolic(g, x, p: int, C: int, N: int):  # noqa: N803
        y = g.op("SpaceToDepth", x, blocksize_i=p)  # [B, p*p*C, nh, nw], channel (i*p + j)*C + c
        shape = g.op("Constant", value_t=torch.tensor([-1, p * p, C, N], dtype=torch.int64))
        return g.op("Transpose", g.op("Reshape", y, shape), perm_i=[0, 2, 1, 3])


class _FoldExport(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: int, C: int, nh: int, nw: int) -> torch.Tensor:  # noqa: N803
        return _fold(x, p, nh, nw)

    @staticmethod
    def symbolic(g, x, p: int, C: int, nh: int, nw: int):  # noqa: N803
        shape = g.op("Constant", value_t=torch.tensor([-1, C * p * p, nh, nw], dtype=torch.int64))
        return g.op("DepthToSpace", g.op("Reshape", x, shape), blocksize_i=p, mode_s="CRD")


# [B, C, P, N] <-> [B*N, P, C] (the experts' tokens) as ONNX writes them: one 4-d Transpose (0, 3, 2, 1) is
# moved element by element by onnxruntime (0.3-0.4 ms at 256 px); two transposes of the last two axes with a
# reshape between take a tenth of that. The sessions turn onnxruntime's transpose optimiser off
# (moevit.onnx_camera), which would merge them back into the slow one.
def _bcpn_to_tpc(x: torch.Tensor, C: int, P: int, N: int) -> torch.Tensor:  # noqa: N803
    return x.reshape(-1, C * P, N).transpose(1, 2).reshape(-1, C, P).transpose(1, 2)


def _tpc_to_bcpn(y: torch.Tensor, C: int, P: int, N: int) -> torch.Tensor:  # noqa: N803
    return y.transpose(1, 2).reshape(-1, N, C * P).transpose(1, 2).reshape(-1, C, P, N)


class _BlockIn(nn.Module):
    """MobileVitV2Block up to its first transformer layer: local conv, 1x1 conv, unfold to [B, C, P, N]."""

    def __init__(self, block: MobileVitV2Block, grid: _Grid) -> None:
        super().__init__()
        self.block, self.grid = block, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        B, _, H, W = x.shape
        ph = pw = b.patch_size
        new_h, new_w = math.ceil(H / ph) * ph, math.ceil(W / pw) * pw
        nh, nw = new_h // ph, new_w // pw
        self.grid.nh, self.grid.nw = int(nh), int(nw)
        if (new_h, new_w) != (H, W):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=True)
        x = b.conv_1x1(b.conv_kxk(x))
        C = x.shape[1]
        if torch.onnx.is_in_onnx_export():
            return _UnfoldExport.apply(x, ph, int(C), int(nh * nw))
        return _unfold(x, ph, nh, nw)


class _BlockOut(nn.Module):
    """MobileVitV2Block after its last transformer layer: norm, fold back to [B, C, H, W], projection."""

    def __init__(self, block: MobileVitV2Block, grid: _Grid) -> None:
        super().__init__()
        self.block, self.grid = block, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        ph = b.patch_size
        nh, nw = self.grid.nh, self.grid.nw
        x = b.norm(x)
        B, C = x.shape[:2]
        if torch.onnx.is_in_onnx_export():
            x = _FoldExport.apply(x, ph, int(C), int(nh), int(nw))
        else:
            x = _fold(x, ph, nh, nw)
        return b.conv_proj(x)


class _Route(nn.Module):
    """An MoE transformer layer up to its dispatch point: attention, pre-MLP norm, routing, tokens."""

    def __init__(self, block: LinearTransformerBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        blk = self.block
        layer: MoELayer = blk.mlp  # type: ignore[assignment]
        x = x + blk.attn(blk.norm1(x))
        z_hat = F.group_norm(x, 1, eps=blk.norm2.eps)
        z = z_hat * blk.norm2.weight[:, None, None] + blk.norm2.bias[:, None, None]
        expert_idx_TK, gates_TK, probs_TE = layer.route(z)
        B, C, P, N = z_hat.shape
        if torch.onnx.is_in_onnx_export():
            x_TPC = _bcpn_to_tpc(z_hat, int(C), int(P), int(N))
        else:
            x_TPC = z_hat.permute(0, 3, 2, 1).reshape(B * N, P, C)
        return x, x_TPC, expert_idx_TK, gates_TK, probs_TE


class Segment(nn.Module):
    """Steps from the image or a dispatch point to the next dispatch point or the logits.

    ``index`` 0 takes the image; the others take ``(h, y_TPC)``: the residual stream and the previous MoE layer's
    mixed expert outputs, added first. ``layer`` is the MoE layer whose dispatch point ends the segment (None for
    the last, which ends with the classifier head).
    """

    def __init__(self, index: int, steps: Sequence[nn.Module], end: _Route | None) -> None:
        super().__init__()
        self.index = index
        self.steps = nn.ModuleList(steps)
        self.end = end
        self.layer: MoELayer | None = end.block.mlp if end is not None else None  # type: ignore[assignment]

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("image",) if self.index == 0 else ("h_in", "y_TPC")

    @property
    def output_names(self) -> tuple[str, ...]:
        return DISPATCH_OUTPUTS if self.end is not None else ("logits",)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.index == 0:
            (x,) = inputs
        else:
            h, y_TPC = inputs
            B, C, P, N = h.shape
            if torch.onnx.is_in_onnx_export():
                x = h + _tpc_to_bcpn(y_TPC, int(C), int(P), int(N))
            else:
                x = h + y_TPC.reshape(B, N, P, C).permute(0, 3, 2, 1)  # the MoE layer's residual add
        for step in self.steps:
            x = step(x)
        return self.end(x) if self.end is not None else x


class CameraProgram(nn.Module):
    """``model`` (in eval mode; fold its BatchNorms first if it runs folded) as :class:`Segment` s.

    The segments share the model's modules (no copy): the model's dispatchers, folding and weights are theirs.
    """

    def __init__(self, model: MobileViTV2) -> None:
        super().__init__()
        self.model = model  # a dense model is one segment, image to logits
        segments: list[Segment] = []
        steps: list[nn.Module] = [model.stem, model.stages[0], model.stages[1]]
        for stage in model.stages[2:]:
            steps.append(stage[0])
            block: MobileVitV2Block = stage[1]
            grid = _Grid()
            steps.append(_BlockIn(block, grid))
            for blk in block.transformer:
                if blk.is_moe:
                    segments.append(Segment(len(segments), steps, _Route(blk)))
                    steps = []
                else:
                    steps.append(blk)
            steps.append(_BlockOut(block, grid))
        steps.append(model.head)
        segments.append(Segment(len(segments), steps, None))
        self.segments = nn.ModuleList(segments)
        # new modules start in training mode; the ONNX exporter restores a segment's mode recursively after export,
        # so a segment left in training mode would switch the shared model's dropout (and BatchNorms) on
        self.train(model.training)

    @property
    def layers(self) -> list[MoELayer]:
        """The MoE layers at the dispatch points, in forward order."""
        return [s.layer for s in self.segments if s.layer is not None]

    def run(self, x: torch.Tensor, segment_fn: Callable[[Segment, tuple[torch.Tensor, ...]], object] | None = None,
            ) -> torch.Tensor:
        """Logits of images ``x``: segments by ``segment_fn(segment, inputs)`` (default: the torch segment), each
        dispatch point by its layer's :meth:`~moevit.moe.MoELayer.mix`."""
        self.model.check_input(x)
        run = segment_fn or (lambda seg, inputs: seg(*inputs))
        inputs: tuple[torch.Tensor, ...] = (x,)
        batch = x.shape[0]
        for seg in self.segments:
            out = run(seg, inputs)
            if seg.layer is None:
                return out  # type: ignore[return-value]
            h, x_TPC, idx, gates, probs = out  # type: ignore[misc]
            inputs = (h, seg.layer.mix(x_TPC, idx, gates, probs, batch=batch))
        raise AssertionError("unreachable: the last segment returns the logits")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)
