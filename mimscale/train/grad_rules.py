"""Gradient rules applied inside DeepSpeed's optimizer step, where the gradient of every parameter is final
(reduced over ranks and accumulation steps, unscaled), as the official DINO/iBOT loop applies them after
``backward`` (``main_ibot.py``: ``utils.clip_gradients(student, args.clip_grad)`` then
``utils.cancel_gradients_last_layer(...)``, then ``optimizer.step()``):

* **per-parameter clipping** (``optim.clip_mode="per_param"``): each parameter's gradient is scaled by
  ``min(1, clip / (||g|| + 1e-6))`` with its *own* norm (DINO/iBOT ``utils.clip_gradients``), instead of
  DeepSpeed's clipping of the global norm. Under ZeRO a parameter's gradient is spread over the ranks' flat
  partitions (ZeRO-1/2: contiguous slices of one flat buffer; ZeRO-3: every parameter partitioned on its
  own), so each rank sums the squares of its slice of every parameter and one all-reduce of a vector with one
  entry per parameter gives the full norms: exact, and no gradient is gathered.
* **frozen groups skip the update** (``optim.frozen_groups="skip"``): parameters the method freezes for the
  first steps (iBOT's last head layer in the first epoch) get no gradient at all, as the official code sets
  ``p.grad = None``: AdamW then leaves their moments and step count untouched. mimscale puts them in groups of
  their own (:func:`mimscale.train.optim.param_groups`), whose flat partitions get ``grad = None`` here.

Both are applied by wrapping the step of the torch optimizer DeepSpeed drives, which sees one flat fp32
partition per (sub-)group; the wrapper maps each partition back to the parameters in it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mimscale.dist import all_reduce_sum

__all__ = ["GradientRules", "base_optimizer"]

CLIP_EPS = 1e-6  # DINO/iBOT utils.clip_gradients: clip_coef = clip / (param_norm + 1e-6)


def base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, bf16/fp16 optimizers)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) or isinstance(getattr(opt, "optimizer", None),
                                                                     torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


class _Layout:
    """Where each parameter's gradient sits in the flat partitions this rank's optimizer steps."""

    def __init__(self, engine: Any) -> None:
        self.segments: dict[int, list[tuple[int, int]]] = {}  # id(flat tensor) -> [(start, end) per param]
        zopt = engine.optimizer
        if hasattr(zopt, "single_partition_of_fp32_groups") and hasattr(zopt, "round_robin_bit16_offsets"):
            self._zero12(zopt)
        elif hasattr(zopt, "fp32_partitioned_groups_flat") and hasattr(zopt, "fp16_partitioned_groups"):
            self._zero3(zopt)
        elif isinstance(zopt, torch.optim.Optimizer):  # no ZeRO, fp32: the optimizer holds the parameters
            self.whole_params = True
        else:
            raise NotImplementedError(
                f"per-parameter gradient rules need a ZeRO-1/2/3 optimizer or plain fp32 training; "
                f"DeepSpeed built {type(zopt).__name__}. Use optim.clip_mode='global' and "
                "optim.frozen_groups='zero_lr', or a shipped zero1/2/3 config")
        self.whole_params = getattr(self, "whole_params", False)

    def _zero12(self, zopt: Any) -> None:
        for i, flat in enumerate(zopt.single_partition_of_fp32_groups):
            size = zopt.partition_size[i]
            rank = torch.distributed.get_rank(group=zopt.real_dp_process_group[i]) \
                if torch.distributed.is_initialized() else 0
            lo, hi = rank * size, (rank + 1) * size
            segs = []
            for p, offset in zip(zopt.round_robin_bit16_groups[i], zopt.round_robin_bit16_offsets[i]):
                start, end = max(offset, lo), min(offset + p.numel(), hi)
                segs.append((start - lo, end - lo) if start < end else (0, 0))
            self.segments[id(flat)] = segs

    def _zero3(self, zopt: Any) -> None:
        for flat, parts in zip(zopt.fp32_partitioned_groups_flat, zopt.fp16_partitioned_groups):
            segs, offset = [], 0
            for part in parts:
                segs.append((offset, offset + part.numel()))
                offset += part.numel()
            self.segments[id(flat)] = segs

    def of(self, tensor: torch.Tensor) -> list[tuple[int, int]]:
        if self.whole_params:
            return [(0, tensor.numel())]
        try:
            return self.segments[id(tensor)]
        except KeyError:
            raise RuntimeError("per-parameter gradient rules: the optimizer steps a tensor DeepSpeed's ZeRO "
                               "optimizer does not list (a DeepSpeed change?)") from None


class GradientRules:
    """Install on a built engine; :attr:`step` must hold the 0-based optimizer step about to be taken."""

    def __init__(self, engine: Any, clip: float | None, skip_frozen: bool) -> None:
        self.clip = clip
        self.skip_frozen = skip_frozen
        self.step = 0
        self.layout = _Layout(engine) if clip else None
        self.optimizer = base_optimizer(engine)
        self._inner: Callable[..., Any] = self.optimizer.step
        self.optimizer.step = self._step  # type: ignore[method-assign]

    def _step(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            stepping = []
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if self.skip_frozen and group.get("frozen_steps", 0) > self.step:
                        p.grad = None  # official: grads of the frozen layer are None, AdamW skips them
                        continue
                    stepping.append(p)
            if self.clip and stepping:
                self._clip_per_param(stepping)
        return self._inner(*args, **kwargs)

    def _clip_per_param(self, flats: list[torch.Tensor]) -> None:
        """Scale every parameter's gradient slice by ``min(1, clip / (||g|| + 1e-6))``, its norm summed over
        the ranks (collective: every rank steps the same groups in the same order)."""
        pieces = [(f.grad.view(-1), self.layout.of(f)) for f in flats]
        sq = torch.cat([
            torch.stack([g[a:b].double().pow(2).sum() for a, b in segs]) if segs
            else torch.zeros(0, dtype=torch.float64, device=g.device)
            for g, segs in pieces
        ])
        if not self.layout.whole_params:
            all_reduce_sum(sq)
        coef = (self.clip / (sq.sqrt() + CLIP_EPS)).clamp(max=1.0).tolist()  # one host sync per step
        k = 0
        for g, segs in pieces:
            for a, b in segs:
                if b > a and coef[k] < 1:
                    g[a:b].mul_(coef[k])
                k += 1
