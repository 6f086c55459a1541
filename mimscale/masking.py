"""Mask generators: one call draws the masks of a whole batch on the training device.

Every masker returns a ``torch.bool`` tensor ``[batch_size, H*W]`` over the model's patch grid,
row-major, where ``True`` means *masked* (hidden from the student and covered by the loss).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

Grid = tuple[int, int]


def _as_grid(grid: int | Grid) -> Grid:
    if isinstance(grid, int):
        grid = (grid, grid)
    grid = tuple(int(g) for g in grid)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid={grid!r}: expected (height, width) with both >= 1")
    return grid  # type: ignore[return-value]


class RandomMasker:
    """MAE's per-sample uniform masking (He et al. 2022, facebookresearch/mae ``random_masking``).

    Each sample keeps exactly ``int(L * (1 - mask_ratio))`` patches (Python truncation, as the official
    code: L=200, r=0.8 keeps 39); the rest are masked. Drawn as argsort of uniform noise, batched.
    """

    def __init__(self, grid: int | Grid = (14, 14), mask_ratio: float = 0.75) -> None:
        self.grid = _as_grid(grid)
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio!r}: expected a float in [0, 1)")
        self.mask_ratio = float(mask_ratio)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_keep = int(self.num_patches * (1 - self.mask_ratio))
        if self.num_keep < 1:
            raise ValueError(f"mask_ratio={mask_ratio!r} keeps no patch of a {self.grid} grid")

    def noise_ranks(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Patch indices of each sample sorted by uniform noise: ``[B, L]`` (rank 0 is kept first)."""
        noise = torch.rand(batch_size, self.num_patches, generator=generator, device=device)
        return torch.argsort(noise, dim=1)

    def __call__(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        ids_shuffle = self.noise_ranks(batch_size, generator=generator, device=device)
        mask = torch.ones(batch_size, self.num_patches, dtype=torch.bool, device=ids_shuffle.device)
        mask.scatter_(1, ids_shuffle[:, : self.num_keep], False)
        return mask

    def __repr__(self) -> str:
        return f"RandomMasker(grid={self.grid}, mask_ratio={self.mask_ratio})"


def _work_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    """Where to draw: on the generator's device when one is given (``torch.rand`` requires it, and a CPU
    generator then gives the same masks whatever ``device`` is), else on ``device`` (CPU by default)."""
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def _as_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    return float(value)


def _pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(1, index).squeeze(1)


def _blockwise_fill(
    targets: torch.Tensor,
    grid: Grid,
    min_block: float,
    max_block: float | None,
    log_aspect: tuple[float, float],
    generator: torch.Generator | None,
    max_blocks: int | None = None,
    attempts: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BEiT's block-proposal loop (microsoft/unilm ``beit/masking_generator.py``), run for a batch at once.

    ``targets`` is the float64 ``[B]`` number of cells each sample aims for (fractional in iBOT, whose
    target is ``ratio * H * W``). Returns the masks ``[B, H, W]`` and the masked counts ``[B]``.

    One round places at most one block per still-active sample. The official inner loop makes up to
    ``attempts`` (10) tries against the *same* mask and keeps the first acceptable one, so a round draws
    all tries at once, scores them with box sums over an integral image of the current mask, and paints
    the first accepted try. That is the official distribution exactly (only the RNG stream differs).
    A sample stops when it reaches its target or when all tries of a round fail (the official outer loop
    breaks on ``delta == 0``). Finished samples leave the working set, so the long tail of a few samples
    needing many blocks costs little.
    """
    device = targets.device
    height, width = grid
    batch = targets.shape[0]
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    count = torch.zeros(batch, dtype=torch.long, device=device)
    idx = torch.nonzero(targets > 0).squeeze(1)
    # The working masks are uint8: on a CPU, broadcast painting and the float conversion for the
    # integral image are several times faster than with bool.
    work = torch.zeros(idx.numel(), height, width, dtype=torch.uint8, device=device)
    done_count, goal = count[idx], targets[idx]
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    below = torch.ones(height + 1, height, device=device).tril(-1)  # [i, j] = 1 where j < i
    right = torch.ones(width, width + 1, device=device).triu(1)  # [j, k] = 1 where j < k
    lo, hi = log_aspect
    rounds = 0
    while idx.numel() > 0 and (max_blocks is None or rounds < max_blocks):
        rounds += 1
        n = idx.numel()
        # Official: max_mask_patches = min(target - count, max_num_patches); max_num_patches defaults to
        # the target itself, which never binds because the remainder is smaller.
        cap = goal - done_count
        if max_block is not None:
            cap = cap.clamp(max=max_block)
        u = torch.rand(n, attempts, 4, generator=generator, device=device, dtype=torch.float64)
        # random.uniform(a, b) is a + (b - a) * U even when b < a: once the remainder drops below
        # min_block the area is drawn from [remainder, min_block], and only overlapping blocks can fit.
        area = min_block + (cap[:, None] - min_block) * u[..., 0]
        aspect = torch.exp(lo + (hi - lo) * u[..., 1])
        # torch.round, like Python's round, rounds half to even.
        h = torch.round(torch.sqrt(area * aspect)).long()
        w = torch.round(torch.sqrt(area / aspect)).long()
        fits = (h < height) & (w < width)  # strict, as the official code: a block never spans the grid
        h = torch.where(fits, h, 0)
        w = torch.where(fits, w, 0)
        # random.randint(0, H - h) is inclusive of both ends: H - h + 1 positions.
        top = torch.minimum((u[..., 2] * (height - h + 1)).long(), height - h)
        left = torch.minimum((u[..., 3] * (width - w + 1)).long(), width - w)

        # Integral image [n, H+1, W+1] as two matmuls with 0/1 triangular matrices: exact in float32
        # (counts <= 196) and several times faster on a CPU than cumsum over a bool tensor.
        flat = torch.matmul(below, work.to(torch.float32) @ right).view(n, -1)
        stride = width + 1
        bottom, end = top + h, left + w
        covered = (
            flat.gather(1, bottom * stride + end)
            - flat.gather(1, top * stride + end)
            - flat.gather(1, bottom * stride + left)
            + flat.gather(1, top * stride + left)
        ).long()
        # Already-masked cells inside the box are overlap: only the new ones count, and the official
        # acceptance is 0 < h * w - num_masked <= max_mask_patches.
        new = h * w - covered
        ok = fits & (new > 0) & (new <= cap[:, None])
        hit = ok.any(1)
        first = ok.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first maximum

        t0, l0 = _pick(top, first), _pick(left, first)
        h0, w0 = _pick(h, first) * hit, _pick(w, first) * hit  # no accepted try: an empty box
        in_rows = ((rows >= t0.view(n, 1, 1)) & (rows < (t0 + h0).view(n, 1, 1))).to(torch.uint8)
        in_cols = ((cols >= l0.view(n, 1, 1)) & (cols < (l0 + w0).view(n, 1, 1))).to(torch.uint8)
        work |= in_rows & in_cols
        done_count += _pick(new, first) * hit

        finished = ~hit | (done_count >= goal)
        if bool(finished.any()):
            mask[idx[finished]] = work[finished].bool()
            count[idx[finished]] = done_count[finished]
            keep = ~finished
            idx, work, done_count, goal = idx[keep], work[keep], done_count[keep], goal[keep]
    if idx.numel() > 0:  # stopped by max_blocks
        mask[idx] = work.bool()
        count[idx] = done_count
    return mask, count


def _top_up(
    mask: torch.Tensor, count: torch.Tensor, wanted: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """BEiT v2's exact count (microsoft/unilm ``beit2/masking_generator.py``): mask ``wanted - count``
    unmasked cells drawn uniformly without replacement. ``mask`` is ``[B, L]`` and is updated in place.

    One cell per step for every sample still short: draw ``r ~ U{0, .., free - 1}`` and mask the r-th
    free cell (found with a running count of free cells). Steps ``1..d`` give a uniform ``d``-subset,
    like ``np.random.choice(free, d, replace=False)``. The deficits are small (a handful of cells), so
    this beats sorting noise over all L cells, which is slow for short rows on a CPU.
    """
    deficit = wanted - count
    if bool((deficit < 0).any()):
        # The block loop never accepts more than the remainder, so this is a bug, not a user error.
        raise RuntimeError(f"blockwise masking overshot its target: {count.tolist()} > {wanted.tolist()}")
    rows = torch.nonzero(deficit > 0).squeeze(1)
    sub, need = mask[rows], deficit[rows]
    while rows.numel() > 0:
        free = ~sub
        running = free.view(torch.uint8).cumsum(1, dtype=torch.int32)
        num_free = running[:, -1]
        u = torch.rand(rows.numel(), generator=generator, device=mask.device, dtype=torch.float64)
        r = torch.minimum((u * num_free).to(torch.int32), num_free - 1)
        # The r-th free cell (0-based) sits after exactly the cells whose running count is <= r.
        cell = (running <= r.unsqueeze(1)).sum(1)
        sub[torch.arange(rows.numel(), device=mask.device), cell] = True
        need -= 1
        finished = need == 0
        if bool(finished.any()):
            mask[rows[finished]] = sub[finished]
            keep = ~finished
            rows, sub, need = rows[keep], sub[keep], need[keep]
    return mask


class BlockwiseMasker:
    """BEiT's blockwise masking (Bao et al. 2022; microsoft/unilm ``beit/masking_generator.py``), batched.

    Per sample, repeat until ``num_masked`` cells are masked: draw an area ``~ U(min_block, cap)`` with
    ``cap = min(remaining, max_block)``, a log aspect ``~ U(log min_aspect, -log min_aspect)``, round
    ``h = sqrt(area * aspect)`` and ``w = sqrt(area / aspect)``, require ``h < H`` and ``w < W``, place the
    top-left corner uniformly, and keep the block only if it masks between 1 and ``cap`` new cells
    (already-masked cells under it are overlap). After 10 failed tries of one block the sample stops.

    ``exact=False`` is BEiT v1, which may stop short of ``num_masked``. ``exact=True`` is BEiT v2
    (``beit2/masking_generator.py``): it then masks uniformly drawn unmasked single cells until exactly
    ``num_masked`` are masked.

    The loop is sequential per sample but runs for the whole batch at once with tensor ops (see
    ``_blockwise_fill``): 4096 masks of 14x14 take about 30 ms on two CPU threads, a few times less than
    the official per-sample loop (``python benchmarks/masking.py``).
    Draws happen on the generator's device (CPU by default) and the result moves to ``device``.
    """

    def __init__(
        self,
        grid: int | Grid = (14, 14),
        num_masked: int = 75,
        min_block: float = 16,
        max_block: float | None = None,
        min_aspect: float = 0.3,
        exact: bool = True,
    ) -> None:
        self.grid = _as_grid(grid)
        self.num_patches = self.grid[0] * self.grid[1]
        if isinstance(num_masked, bool) or not isinstance(num_masked, numbers.Integral):
            raise ValueError(f"num_masked={num_masked!r}: expected an int in [1, {self.num_patches}]")
        if not 1 <= num_masked <= self.num_patches:
            raise ValueError(
                f"num_masked={num_masked!r}: expected an int in [1, {self.num_patches}] "
                f"(the {self.grid[0]}x{self.grid[1]} grid has {self.num_patches} cells)"
            )
        min_block_f = _as_number("min_block", min_block)
        if not 1 <= min_block_f <= num_masked:
            raise ValueError(f"min_block={min_block!r}: expected a number in [1, num_masked={num_masked}]")
        if max_block is not None and _as_number("max_block", max_block) < min_block_f:
            raise ValueError(f"max_block={max_block!r}: expected None or a number >= min_block={min_block!r}")
        aspect = _as_number("min_aspect", min_aspect)
        if not 0 < aspect <= 1:
            raise ValueError(
                f"min_aspect={min_aspect!r}: expected a number in (0, 1]; the aspect is drawn log-uniformly "
                "in [min_aspect, 1 / min_aspect]"
            )
        if not isinstance(exact, bool):
            raise ValueError(f"exact={exact!r}: expected True (BEiT v2, exact count) or False (BEiT v1)")
        self.num_masked = int(num_masked)
        self.min_block = min_block_f
        self.max_block = None if max_block is None else float(max_block)
        self.min_aspect = aspect
        self.exact = exact
        self.log_aspect = (math.log(aspect), -math.log(aspect))

    def _targets(
        self, batch_size: int, num_masked: int | float | torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        if num_masked is None:
            return torch.full((batch_size,), float(self.num_masked), dtype=torch.float64, device=device)
        targets = torch.as_tensor(num_masked, dtype=torch.float64).to(device)
        if targets.dim() == 0:
            targets = targets.expand(batch_size)
        if targets.shape != (batch_size,):
            raise ValueError(
                f"num_masked has shape {tuple(targets.shape)}: expected a number or a tensor [{batch_size}]"
            )
        if (
            not bool(torch.isfinite(targets).all())
            or bool((targets < 0).any())
            or bool((targets > self.num_patches).any())
        ):
            raise ValueError(
                f"num_masked={num_masked!r}: every per-sample target must lie in [0, {self.num_patches}]"
            )
        return targets.contiguous()

    def __call__(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        num_masked: int | float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw ``[batch_size, H*W]`` masks (True = masked).

        ``num_masked`` overrides the constructor's target per sample (a number or a ``[batch_size]``
        tensor, fractional allowed as iBOT's ``ratio * H * W``: the loop then runs while the count is below
        it, so at most ``floor`` of it is masked). With ``exact=True`` the top-up goes to that floor.
        When ``max_block`` is None the area cap is the remainder, as in the official code.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size={batch_size!r}: expected an int >= 0")
        work = _work_device(generator, device)
        targets = self._targets(batch_size, num_masked, work)
        mask, count = _blockwise_fill(
            targets, self.grid, self.min_block, self.max_block, self.log_aspect, generator
        )
        mask = mask.view(batch_size, self.num_patches)
        if self.exact:
            mask = _top_up(mask, count, targets.floor().long(), generator)
        return mask if device is None else mask.to(device)

    def __repr__(self) -> str:
        return (
            f"BlockwiseMasker(grid={self.grid}, num_masked={self.num_masked}, min_block={self.min_block:g}, "
            f"max_block={self.max_block}, min_aspect={self.min_aspect:g}, exact={self.exact})"
        )


def _as_pair_list(name: str, value: float | Sequence[float]) -> list[float]:
    values = [value] if isinstance(value, (int, float)) else list(value)
    if not values:
        raise ValueError(f"{name}={value!r}: expected a number or a non-empty sequence of numbers")
    return [_as_number(name, v) for v in values]


class IBOTMasker:
    """iBOT's masking of a global crop (Zhou et al. 2022; bytedance/ibot ``loader.py`` ImageFolderMask).

    Per image a ratio is drawn as iBOT's ``get_pred_ratio``: for each ``(pred_ratio[i], pred_ratio_var[i])``
    a value ``U(m - v, m + v)`` (``m`` when ``v == 0``), then one of them uniformly; the paper's
    ``pred_ratio=(0, 0.3), pred_ratio_var=(0, 0.2)`` gives 0 with probability 1/2, else ``U(0.1, 0.5)``.
    The image is then masked blockwise towards ``ratio * H * W`` cells (a fractional target, as iBOT),
    without BEiT v2's top-up, with iBOT's minimum block ``(min(H, W) // 3) ** 2`` and no maximum.
    """

    def __init__(
        self,
        grid: int | Grid = (14, 14),
        pred_ratio: float | Sequence[float] = (0.0, 0.3),
        pred_ratio_var: float | Sequence[float] = (0.0, 0.2),
        min_aspect: float = 0.3,
    ) -> None:
        self.grid = _as_grid(grid)
        self.num_patches = self.grid[0] * self.grid[1]
        ratios = _as_pair_list("pred_ratio", pred_ratio)
        spreads = _as_pair_list("pred_ratio_var", pred_ratio_var)
        if len(spreads) == 1:
            spreads = spreads * len(ratios)
        if len(spreads) != len(ratios):
            raise ValueError(
                f"pred_ratio_var={pred_ratio_var!r}: expected one value or one per pred_ratio={pred_ratio!r}"
            )
        for m, v in zip(ratios, spreads):
            if not (0 <= v <= m and m + v <= 1):
                raise ValueError(
                    f"pred_ratio={m!r} with pred_ratio_var={v!r}: "
                    "expected 0 <= var <= ratio and ratio + var <= 1"
                )
        self.pred_ratio = tuple(ratios)
        self.pred_ratio_var = tuple(spreads)
        # iBOT's `low`; at least 1 so that grids under 3 cells wide still draw positive areas.
        min_block = max((min(self.grid) // 3) ** 2, 1)
        self.blockwise = BlockwiseMasker(
            self.grid, num_masked=self.num_patches, min_block=min_block, min_aspect=min_aspect, exact=False
        )

    def sample_ratios(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Per-image mask ratios ``[batch_size]`` (float64), drawn on the generator's device."""
        work = _work_device(generator, device)
        m = torch.tensor(self.pred_ratio, dtype=torch.float64, device=work)
        v = torch.tensor(self.pred_ratio_var, dtype=torch.float64, device=work)
        u = torch.rand(batch_size, len(m) + 1, generator=generator, device=work, dtype=torch.float64)
        candidates = m - v + 2 * v * u[:, :-1]
        choice = (u[:, -1] * len(m)).long().clamp(max=len(m) - 1)
        return candidates.gather(1, choice.unsqueeze(1)).squeeze(1)

    def __call__(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        ratios = self.sample_ratios(batch_size, generator=generator, device=device)
        return self.blockwise(
            batch_size, generator=generator, device=device, num_masked=ratios * self.num_patches
        )

    def __repr__(self) -> str:
        return (
            f"IBOTMasker(grid={self.grid}, pred_ratio={self.pred_ratio}, "
            f"pred_ratio_var={self.pred_ratio_var}, "
            f"min_aspect={self.blockwise.min_aspect:g})"
        )


class SimMIMMasker:
    """SimMIM's random masking of coarse cells (Xie et al. 2022; microsoft/SimMIM ``data/data_simmim.py``).

    The image is cut into ``mask_patch_size`` cells (32 px: the paper finds large cells harder, hence
    better, than model patches); exactly ``ceil(cells * mask_ratio)`` cells are masked per sample, drawn
    uniformly (argsort of noise, batched), and each cell is expanded to the
    ``(mask_patch_size // model_patch_size)^2`` model patches it covers. ``grid`` is the model's patch grid.
    """

    def __init__(
        self,
        img_size: int | Grid = 224,
        mask_patch_size: int = 32,
        model_patch_size: int = 16,
        mask_ratio: float = 0.6,
    ) -> None:
        for name, value in (("mask_patch_size", mask_patch_size), ("model_patch_size", model_patch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected an int >= 1")
        try:
            image = _as_grid(img_size)
        except (TypeError, ValueError):
            raise ValueError(
                f"img_size={img_size!r}: expected an int or (height, width), both >= 1"
            ) from None
        if any(side % mask_patch_size for side in image):
            raise ValueError(
                f"img_size={img_size!r} is not divisible by mask_patch_size={mask_patch_size}: "
                "the coarse mask cells must tile the image"
            )
        if mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size={mask_patch_size} is not divisible by model_patch_size={model_patch_size}: "
                "each mask cell must cover whole model patches"
            )
        if (
            isinstance(mask_ratio, bool)
            or not isinstance(mask_ratio, (int, float))
            or not 0 <= mask_ratio < 1
        ):
            raise ValueError(f"mask_ratio={mask_ratio!r}: expected a float in [0, 1)")
        self.img_size = image
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = float(mask_ratio)
        self.scale = mask_patch_size // model_patch_size
        self.coarse_grid = (image[0] // mask_patch_size, image[1] // mask_patch_size)
        self.num_cells = self.coarse_grid[0] * self.coarse_grid[1]
        # Official: int(np.ceil(token_count * mask_ratio)), the same float product as here.
        self.num_masked_cells = math.ceil(self.num_cells * self.mask_ratio)
        self.grid = (self.coarse_grid[0] * self.scale, self.coarse_grid[1] * self.scale)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = self.num_masked_cells * self.scale**2

    def __call__(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        work = _work_device(generator, device)
        noise = torch.rand(batch_size, self.num_cells, generator=generator, device=work)
        order = noise.argsort(1)
        coarse = torch.zeros(batch_size, self.num_cells, dtype=torch.bool, device=work)
        coarse.scatter_(1, order[:, : self.num_masked_cells], True)
        mask = (
            coarse.view(batch_size, *self.coarse_grid)
            .repeat_interleave(self.scale, dim=1)
            .repeat_interleave(self.scale, dim=2)
            .reshape(batch_size, self.num_patches)
        )
        return mask if device is None else mask.to(device)

    def __repr__(self) -> str:
        return (
            f"SimMIMMasker(img_size={self.img_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})"
        )
