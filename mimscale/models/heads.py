"""Small heads the methods put on top of the encoder, and the BEiT-family weight init they share.

Each head is its own class; methods import what they need. Keep one class per head (other methods add
theirs below) so a reader finds a method's head by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mimscale.dist import all_reduce_sum, get_world_size


def trunc_normal_within_std_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Normal(0, std) truncated at **one** standard deviation, ``[-std, std]``.

    The BEiT-derived official code of SimMIM (``models/simmim.py``, ``VisionTransformerForSimMIM
    ._trunc_normal_``) and data2vec vision (``beit/modeling_cyclical.py``) call timm's ``trunc_normal_``
    with ``a=-std, b=std``; timm's own default truncates at +-2 *absolute*, i.e. +-100 std, which is a
    plain normal. The narrower draw has a ~0.54x smaller empirical std, so it matters for reproduction.
    """
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


@torch.no_grad()
def init_beit_style_(module: nn.Module, std: float = 0.02) -> None:
    """The weight init of the BEiT-derived pretraining models of SimMIM and data2vec vision.

    Every ``nn.Linear`` and ``nn.Conv2d`` weight (the patch projection included) is drawn with
    :func:`trunc_normal_within_std_`, biases are zeroed, LayerNorms are (1, 0); then BEiT's
    ``fix_init_weight`` divides each block's ``attn.proj`` and ``mlp.fc2`` weights by ``sqrt(2 * depth_i)``
    (1-based block index). The CLS token and a learnable absolute position table, if any, get the same
    truncated draw; a relative position bias table stays at timm's zeros, as in the official code.
    Layer-scale gammas (``init_values``) are left as the model built them.

    ``module`` is a timm ``Beit``/``VisionTransformer``, or any module (e.g. a head) without blocks.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_within_std_(m.weight, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for name in ("cls_token", "pos_embed"):
        p = getattr(module, name, None)
        if isinstance(p, nn.Parameter):  # a fixed sin-cos table is a buffer: left alone
            trunc_normal_within_std_(p, std)
    blocks = getattr(module, "blocks", None)
    if blocks is not None:
        for i, blk in enumerate(blocks):
            scale = math.sqrt(2.0 * (i + 1))
            blk.attn.proj.weight.div_(scale)
            blk.mlp.fc2.weight.div_(scale)


class PixelShuffleHead(nn.Module):
    """SimMIM's one-layer prediction head (Xie et al. 2022, ``models/simmim.py``): a 1x1 convolution to
    ``stride**2 * out_chans`` channels, then ``PixelShuffle(stride)`` back to image resolution.

    ``stride`` is the encoder's total stride (the patch size for a ViT). Input: patch tokens ``[B, L, D]``
    (CLS already dropped), row-major over ``grid``; output ``[B, out_chans, H, W]`` with
    ``(H, W) = (grid_h * stride, grid_w * stride)``.
    The convolution keeps PyTorch's default init, as in the official code (the head sits outside the
    encoder the official init is applied to).
    """

    def __init__(self, in_dim: int, stride: int, out_chans: int = 3) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(in_dim, stride**2 * out_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, d = tokens.shape
        if n != grid[0] * grid[1]:
            raise ValueError(f"PixelShuffleHead got {n} tokens for a {grid} grid (drop CLS first)")
        x = tokens.transpose(1, 2).reshape(b, d, grid[0], grid[1])
        return self.shuffle(self.proj(x))


# ---------------------------------------------------------------------------------------------------
# LUT (Kim et al. 2024; naver-ai/lut): BYOL-style projector/predictor with cross-rank batch statistics


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the ranks of the default group.

    The output is the same on every rank, so the gradient of the *sum of all ranks' losses* with respect
    to this rank's input is the sum of every rank's upstream gradient: backward is an all-reduce too
    (the semantics of ``nn.SyncBatchNorm``, whose gradients DeepSpeed then averages like any other).
    Written here instead of ``torch.distributed.nn.functional.all_reduce`` (deprecated) so it works on
    every backend, gloo included.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor.clone(memory_format=torch.contiguous_format))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.clone(memory_format=torch.contiguous_format))


class AllReduceBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` over ``[N, C]`` whose training statistics are the union of every rank's batch.

    LUT's official code converts the whole model with ``nn.SyncBatchNorm.convert_sync_batchnorm``
    (``main_lut.py``), so the projector/predictor normalise over the global batch. ``nn.SyncBatchNorm``
    refuses CPU tensors and must be converted after the process group exists; this module decides at
    each forward (training mode, ``sync``, default group initialised, world > 1) and works on any device
    and backend, so the path the CPU tests exercise is the one clusters run.

    Arithmetic is fp32 whatever the parameter, buffer and input dtypes (DeepSpeed may cast parameters
    but not buffers, or both), as BatchNorm under autocast in the official AMP runs. Statistics take two
    exact passes (global mean, then global sum of squared deviations: no ``E[x^2] - E[x]^2``
    cancellation), each one differentiable all-reduce of ``C`` (+1) values when synchronised; the running
    variance uses the unbiased global estimate, as ``nn.SyncBatchNorm``. Eval mode normalises with the
    running statistics. State-dict keys are BatchNorm's own.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, sync: bool = True) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True)
        self.sync = sync

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sync={self.sync}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"AllReduceBatchNorm1d expects [N, {self.num_features}] inputs, "
                             f"got {tuple(x.shape)}")
        xf = x.float()
        if not self.training:
            y = (xf - self.running_mean.float()) * torch.rsqrt(self.running_var.float() + self.eps)
        else:
            sync = self.sync and get_world_size() > 1
            if not sync and x.shape[0] < 2:
                raise ValueError(f"AllReduceBatchNorm1d needs more than 1 sample in training, "
                                 f"got {x.shape[0]}")
            reduce = _AllReduceSum.apply if sync else (lambda t: t)
            count = xf.new_full((1,), float(xf.shape[0]))
            sums = reduce(torch.cat([xf.sum(0), count]))
            n = sums[-1]  # the global count stays a tensor: no host sync (>= 2 with world > 1)
            mean = sums[:-1] / n
            centred = xf - mean
            sq = reduce(centred.square().sum(0))
            y = centred * torch.rsqrt(sq / n + self.eps)
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = sq.detach() / (n.detach() - 1)
                self.running_mean.copy_(self.running_mean.float() * (1 - factor) + mean.detach() * factor)
                self.running_var.copy_(self.running_var.float() * (1 - factor) + unbiased * factor)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype)


class BYOLProjectionMLP(nn.Sequential):
    """LUT's projector and predictor (``models_lut.py`` ``_build_mlp`` with 2 layers, BN, ReLU):
    ``Linear(in, hidden, bias=False) -> BatchNorm1d(hidden) -> ReLU -> Linear(hidden, out, bias=False)``,
    no norm after the last layer. The BatchNorm is synchronised across ranks (:class:`AllReduceBatchNorm1d`).

    An ``nn.Sequential`` so the state-dict keys (``0.weight``, ``1.running_mean``, ``3.weight``) are the
    official ``head.*`` / ``predictor.*`` ones. Linear weights keep PyTorch's default init here; LUT
    re-initialises them with MAE's xavier_uniform (the official ``self.apply(_init_weights)`` covers
    the heads).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int | None = None,
                 sync_bn: bool = True) -> None:
        out_dim = in_dim if out_dim is None else out_dim
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            AllReduceBatchNorm1d(hidden_dim, sync=sync_bn),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )


class WeightNormLinear(nn.Module):
    """``Linear(in_dim, out_dim, bias=False)`` under weight normalisation: row ``i`` of the weight is
    ``weight_g[i] * weight_v[i] / ||weight_v[i]||`` (``torch.nn.utils.weight_norm`` with ``dim=0``).

    Written out instead of using PyTorch's weight-norm hooks/parametrizations: those recompute the weight
    from tensors of a *child* module, which ZeRO-3's per-module gathering does not see. The parameter
    names are those of ``nn.utils.weight_norm`` (``weight_g`` ``[out, 1]``, ``weight_v`` ``[out, in]``), as in
    DINO/iBOT checkpoints. ``fix_norm=True`` is their ``norm_last_layer=True``: ``weight_g`` stays at 1 and is
    not trained, so every output is a cosine similarity scaled by the input's norm.
    """

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        # nn.Linear's default init, as the official head builds the layer after its own init pass.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    def weight(self) -> torch.Tensor:
        """The effective weight, computed in float32 (the row norms of an 8192-row bf16 matrix are coarse)."""
        v = self.weight_v.float()
        return self.weight_g.float() * v / v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight().to(x.dtype))


class DINOHead(nn.Module):
    """The DINO/iBOT projection head (Caron et al. 2021; Zhou et al. 2022, bytedance/ibot ``models/head.py``).

    ``Linear(in, hidden) -> GELU -> Linear(hidden, hidden) -> GELU -> Linear(hidden, bottleneck)``
    (``nlayers`` Linear layers in all), l2-normalisation of the bottleneck, then a weight-normalised
    ``Linear(bottleneck, out_dim)`` without bias (:class:`WeightNormLinear`). MLP weights are drawn from
    ``trunc_normal(std=0.02)`` with zero biases; the last layer keeps ``nn.Linear``'s default init.

    iBOT with ``shared_head=True`` applies this one head to the CLS token and to every patch token
    (``iBOTHead`` then aliases ``last_layer2`` to ``last_layer``), so the input may be ``[..., in_dim]``
    with any leading shape.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers={nlayers}: expected >= 1")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)
