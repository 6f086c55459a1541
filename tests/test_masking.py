"""Tests of the mask generators, including the batched BlockwiseMasker against a per-sample reference.

The reference below is a plain transcription of BEiT's ``MaskingGenerator`` (microsoft/unilm
``beit/masking_generator.py``; ``beit2/`` for the exact top-up) written for this test: one sample at a
time, Python's ``random``. The batched masker draws from a different RNG stream, so the two are compared
by statistics over many draws, with fixed seeds so the test is deterministic.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from mimscale.masking import BlockwiseMasker, IBOTMasker, RandomMasker, SimMIMMasker, _blockwise_fill


def reference_blockwise(
    rng: random.Random,
    grid: tuple[int, int],
    target: float,
    min_block: float,
    max_block: float | None = None,
    min_aspect: float = 0.3,
    exact: bool = False,
) -> list[bool]:
    height, width = grid
    mask = [[False] * width for _ in range(height)]
    lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
    count = 0
    while count < target:
        cap = target - count if max_block is None else min(target - count, max_block)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_block, cap)
            aspect = math.exp(rng.uniform(lo, hi))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < height and w < width:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                new = [(i, j) for i in range(top, top + h) for j in range(left, left + w) if not mask[i][j]]
                if 0 < len(new) <= cap:
                    for i, j in new:
                        mask[i][j] = True
                    added = len(new)
                    break
        if added == 0:
            break
        count += added
    if exact:
        free = [(i, j) for i in range(height) for j in range(width) if not mask[i][j]]
        for i, j in rng.sample(free, int(target) - count):
            mask[i][j] = True
    return [cell for row in mask for cell in row]


def components(mask: list[bool], grid: tuple[int, int]) -> int:
    """Number of 4-connected components of masked cells."""
    height, width = grid
    seen = [False] * (height * width)
    found = 0
    for start in range(height * width):
        if not mask[start] or seen[start]:
            continue
        found += 1
        seen[start] = True
        stack = [start]
        while stack:
            cell = stack.pop()
            i, j = divmod(cell, width)
            for ni, nj in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
                nxt = ni * width + nj
                if 0 <= ni < height and 0 <= nj < width and mask[nxt] and not seen[nxt]:
                    seen[nxt] = True
                    stack.append(nxt)
    return found


@pytest.fixture(autouse=True)
def _one_thread():
    """The maskers run many small ops; on a shared CPU a second intra-op thread mostly adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- statistics helpers


def _cell_z(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two-sample z score of each cell's masking frequency (pooled binomial variance)."""
    p1, p2 = a.double().mean(0), b.double().mean(0)
    pooled = (p1 + p2) / 2
    var = pooled * (1 - pooled) * (1 / a.shape[0] + 1 / b.shape[0])
    return torch.where(var > 0, (p1 - p2) / var.clamp(min=1e-12).sqrt(), torch.zeros_like(var))


def _chi2_two_sample(xs: list[int], ys: list[int]) -> tuple[float, int]:
    """Two-sample chi-square over the values' histogram; sparse top bins merge into one tail bin."""
    values = sorted(set(xs) | set(ys))
    bins: list[list[int]] = [[xs.count(v), ys.count(v)] for v in values]
    while len(bins) > 1 and sum(bins[-1]) < 10:
        tail = bins.pop()
        bins[-1] = [bins[-1][0] + tail[0], bins[-1][1] + tail[1]]
    n1, n2 = len(xs), len(ys)
    stat = 0.0
    for c1, c2 in bins:
        total = c1 + c2
        e1, e2 = total * n1 / (n1 + n2), total * n2 / (n1 + n2)
        stat += (c1 - e1) ** 2 / e1 + (c2 - e2) ** 2 / e2
    return stat, len(bins) - 1


def _assert_same_distribution(ref: torch.Tensor, got: torch.Tensor, grid: tuple[int, int]) -> None:
    # Mean masked count.
    cr, cg = ref.sum(1).double(), got.sum(1).double()
    se = math.sqrt(cr.var().item() / len(cr) + cg.var().item() / len(cg) + 1e-12)
    assert abs(cr.mean().item() - cg.mean().item()) < 4.5 * se + 1e-9, (cr.mean(), cg.mean())
    # Per-cell masking frequency map (edges are rarer than the centre; placement bugs show here).
    z = _cell_z(ref, got)
    assert z.abs().max().item() < 4.5, z.view(grid)
    assert (z**2).mean().item() < 1.8, z.view(grid)
    # Number of connected components: how blocks overlap and how many are placed.
    comp_ref = [components(m, grid) for m in ref.tolist()]
    comp_got = [components(m, grid) for m in got.tolist()]
    stat, df = _chi2_two_sample(comp_ref, comp_got)
    assert stat < df + 5 * math.sqrt(2 * max(df, 1)), (stat, df)


N_STAT = 3000


# --------------------------------------------------------------------------- BlockwiseMasker


@pytest.mark.parametrize(
    "grid, num_masked, min_block, max_block, min_aspect, exact",
    [
        ((14, 14), 75, 16, None, 0.3, False),  # BEiT v1 defaults
        ((14, 14), 75, 16, None, 0.3, True),  # BEiT v2 top-up
        ((6, 10), 30, 6, None, 0.3, False),  # narrow grid: the strict h < H, w < W bounds bind often
        ((14, 14), 75, 4, 20, 0.5, False),  # max_block caps the area
    ],
)
def test_blockwise_matches_reference(grid, num_masked, min_block, max_block, min_aspect, exact):
    rng = random.Random(1)
    ref = torch.tensor(
        [
            reference_blockwise(rng, grid, num_masked, min_block, max_block, min_aspect, exact)
            for _ in range(N_STAT)
        ]
    )
    masker = BlockwiseMasker(grid, num_masked, min_block, max_block, min_aspect, exact)
    got = masker(N_STAT, generator=torch.Generator().manual_seed(0))
    assert got.shape == (N_STAT, grid[0] * grid[1]) and got.dtype == torch.bool
    _assert_same_distribution(ref, got, grid)


def test_ibot_matches_reference():
    grid = (14, 14)
    rng = random.Random(2)
    ref = []
    for _ in range(N_STAT):
        # iBOT's get_pred_ratio with pred_ratio [0, 0.3], pred_ratio_var [0, 0.2], then `high = r * H * W`.
        ratio = rng.choice([0.0, rng.uniform(0.1, 0.5)])
        ref.append(reference_blockwise(rng, grid, ratio * 196, min_block=16))
    ref = torch.tensor(ref)
    masker = IBOTMasker(grid)
    got = masker(N_STAT, generator=torch.Generator().manual_seed(0))
    _assert_same_distribution(ref, got, grid)
    zero = (got.sum(1) == 0).double().mean().item()
    assert abs(zero - 0.5) < 0.05


def test_ibot_ratios():
    masker = IBOTMasker()
    ratios = masker.sample_ratios(4000, generator=torch.Generator().manual_seed(0))
    nonzero = ratios[ratios > 0]
    assert abs(len(nonzero) / 4000 - 0.5) < 0.04
    assert nonzero.min() >= 0.1 and nonzero.max() <= 0.5
    assert abs(nonzero.mean().item() - 0.3) < 0.01
    assert torch.equal(
        IBOTMasker(pred_ratio=0.4, pred_ratio_var=0.0).sample_ratios(5),
        torch.full((5,), 0.4, dtype=torch.float64),
    )


def test_blockwise_top_up_is_a_uniform_subset():
    # On a 1-row grid no block fits (h < 1 is impossible): v1 masks nothing and v2's top-up alone
    # masks 2 of 6 cells, which must be each of the 15 pairs equally often (np.random.choice semantics).
    assert not BlockwiseMasker((1, 6), 2, min_block=1, exact=False)(64).any()
    masks = BlockwiseMasker((1, 6), 2, min_block=1, exact=True)(
        6000, generator=torch.Generator().manual_seed(0)
    )
    assert (masks.sum(1) == 2).all()
    codes = (masks.long() * (2 ** torch.arange(6))).sum(1)
    freq = torch.bincount(codes, minlength=64)[codes.unique()]
    assert len(freq) == 15
    expected = 6000 / 15
    chi2 = ((freq - expected) ** 2 / expected).sum().item()
    assert chi2 < 14 + 5 * math.sqrt(28), freq


@pytest.mark.parametrize("grid, num_masked", [((14, 14), 75), ((14, 14), 150), ((14, 14), 196), ((3, 5), 9)])
def test_blockwise_exact_count(grid, num_masked):
    masker = BlockwiseMasker(grid, num_masked, min_block=min(16, num_masked), exact=True)
    masks = masker(512, generator=torch.Generator().manual_seed(0))
    assert (masks.sum(1) == num_masked).all()


def test_blockwise_v1_never_over_and_short_when_aggressive():
    masks = BlockwiseMasker(num_masked=75, exact=False)(1024, generator=torch.Generator().manual_seed(0))
    assert (masks.sum(1) <= 75).all()
    aggressive = BlockwiseMasker(num_masked=150, min_block=16, exact=False)
    counts = aggressive(512, generator=torch.Generator().manual_seed(0)).sum(1)
    assert (counts <= 150).all()
    assert (counts < 150).float().mean() > 0.2  # large blocks cannot fill the last gaps: v1 stops short


def test_blockwise_per_sample_targets():
    masker = BlockwiseMasker(num_masked=75, exact=False)
    targets = torch.tensor([0.0, 19.6, 40.0, 98.0, 196.0])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        counts = masker(5, generator=gen, num_masked=targets).sum(1)
        assert counts[0] == 0
        assert (counts <= targets.floor().long()).all()
    exact = BlockwiseMasker(num_masked=75, exact=True)
    counts = exact(5, generator=gen, num_masked=targets).sum(1)
    assert counts.tolist() == [0, 19, 40, 98, 196]
    assert (exact(3, num_masked=30).sum(1) == 30).all()
    with pytest.raises(ValueError, match=r"shape"):
        masker(4, num_masked=targets)
    with pytest.raises(ValueError, match=r"\[0, 196\]"):
        masker(2, num_masked=torch.tensor([10.0, 197.0]))


@pytest.mark.parametrize("min_block, max_block, min_aspect", [(16, None, 0.3), (4, 10, 0.5), (9, 40, 0.2)])
def test_blockwise_single_block_is_a_bounded_rectangle(min_block, max_block, min_aspect):
    grid = (14, 14)
    target = 75
    targets = torch.full((2000,), float(target), dtype=torch.float64)
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    masks, counts = _blockwise_fill(
        targets, grid, min_block, max_block, log_aspect, torch.Generator().manual_seed(0), max_blocks=1
    )
    cap = target if max_block is None else max_block
    assert (counts == masks.flatten(1).sum(1)).all()
    placed = 0
    for mask in masks:
        rows = mask.any(1).nonzero().squeeze(1)
        cols = mask.any(0).nonzero().squeeze(1)
        if len(rows) == 0:
            continue  # all 10 tries of the first block rejected
        placed += 1
        h, w = len(rows), len(cols)
        assert mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all() and mask.sum() == h * w
        assert h < grid[0] and w < grid[1]
        assert 0 < h * w <= cap
        # h = round(sqrt(area * aspect)) and w = round(sqrt(area / aspect)) for some area in
        # [min_block, cap] and aspect in [min_aspect, 1 / min_aspect]: bounds up to rounding.
        assert (h + 0.5) * (w + 0.5) >= min_block and (h - 0.5) * (w - 0.5) <= cap
        assert (h + 0.5) / (w - 0.5) >= min_aspect and (h - 0.5) / (w + 0.5) <= 1 / min_aspect
    assert placed > 1900


def test_blockwise_reproducible_and_device():
    masker = BlockwiseMasker()
    a = masker(64, generator=torch.Generator().manual_seed(7))
    b = masker(64, generator=torch.Generator().manual_seed(7))
    c = masker(64, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = masker(64, generator=torch.Generator().manual_seed(7), device="cpu")
    assert d.device.type == "cpu" and torch.equal(a, d)
    assert masker(0).shape == (0, 196)
    if torch.cuda.is_available():
        e = masker(64, generator=torch.Generator().manual_seed(7), device="cuda")
        assert e.device.type == "cuda" and torch.equal(a, e.cpu())
        f = masker(64, device="cuda")
        assert f.device.type == "cuda" and (f.sum(1) == 75).all()


def test_ibot_reproducible():
    masker = IBOTMasker()
    a = masker(32, generator=torch.Generator().manual_seed(3))
    b = masker(32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (32, 196)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_masked=197), r"num_masked=197.*\[1, 196\]"),
        (dict(num_masked=0), r"num_masked=0"),
        (dict(num_masked=7.5), r"num_masked=7.5"),
        (dict(num_masked=10, min_block=16), r"min_block=16.*num_masked=10"),
        (dict(min_block=0), r"min_block=0"),
        (dict(max_block=8), r"max_block=8.*min_block=16"),
        (dict(min_aspect=0.0), r"min_aspect=0.0.*\(0, 1\]"),
        (dict(min_aspect=-1), r"min_aspect=-1"),
        (dict(min_aspect=2.0), r"min_aspect=2.0"),
        (dict(exact=1), r"exact=1"),
        (dict(grid=(0, 14)), r"grid"),
    ],
)
def test_blockwise_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockwiseMasker(**kwargs)


# --------------------------------------------------------------------------- SimMIMMasker


@pytest.mark.parametrize(
    "img_size, mask_patch_size, model_patch_size, mask_ratio, cells, scale",
    [
        (224, 32, 16, 0.6, 49, 2),
        (192, 32, 4, 0.6, 36, 8),
        (224, 32, 32, 0.5, 49, 1),
        ((96, 64), 32, 16, 0.6, 6, 2),
    ],
)
def test_simmim_counts_and_structure(img_size, mask_patch_size, model_patch_size, mask_ratio, cells, scale):
    masker = SimMIMMasker(img_size, mask_patch_size, model_patch_size, mask_ratio)
    k = math.ceil(cells * mask_ratio)  # official: int(np.ceil(token_count * mask_ratio))
    assert masker.num_cells == cells and masker.num_masked_cells == k and masker.scale == scale
    gh, gw = masker.grid
    assert masker.num_patches == gh * gw
    masks = masker(256, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (256, gh * gw) and masks.dtype == torch.bool
    assert (masks.sum(1) == k * scale**2).all()
    # Each coarse cell covers a scale x scale square of model patches, all masked or all visible.
    blocks = masks.view(256, gh // scale, scale, gw // scale, scale)
    assert (blocks.all(dim=(2, 4)) == blocks.any(dim=(2, 4))).all()


def test_simmim_ceil_and_uniform_frequency():
    masker = SimMIMMasker(224, 32, 16, 0.6)
    assert masker.num_masked_cells == 30  # ceil(49 * 0.6) = ceil(29.4)
    n = 8000
    masks = masker(n, generator=torch.Generator().manual_seed(0))
    coarse = masks.view(n, 7, 2, 7, 2)[:, :, 0, :, 0].reshape(n, 49).double()
    p = 30 / 49
    z = (coarse.mean(0) - p) / math.sqrt(p * (1 - p) / n)
    assert z.abs().max() < 4.5


def test_simmim_reproducible_and_device():
    masker = SimMIMMasker()
    a = masker(16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, masker(16, generator=torch.Generator().manual_seed(1), device="cpu"))
    assert masker.grid == (14, 14) and masker.num_patches == 196
    if torch.cuda.is_available():
        assert torch.equal(a, masker(16, generator=torch.Generator().manual_seed(1), device="cuda").cpu())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(img_size=200), r"img_size=200.*mask_patch_size=32"),
        (dict(mask_patch_size=24), r"img_size=224.*mask_patch_size=24"),
        (
            dict(img_size=240, mask_patch_size=48, model_patch_size=32),
            r"mask_patch_size=48.*model_patch_size=32",
        ),
        (dict(mask_ratio=1.0), r"mask_ratio=1.0.*\[0, 1\)"),
        (dict(mask_ratio=-0.1), r"mask_ratio=-0.1"),
        (dict(model_patch_size=0), r"model_patch_size=0"),
    ],
)
def test_simmim_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimMIMMasker(**kwargs)


# --------------------------------------------------------------------------- RandomMasker and common API


def test_random_masker_keeps_truncated_count():
    masker = RandomMasker(grid=(10, 20), mask_ratio=0.8)
    assert masker.num_keep == 39  # int(200 * (1 - 0.8)) = int(39.999...) = 39, as MAE
    masks = masker(8, generator=torch.Generator().manual_seed(0))
    assert (masks.sum(1) == 200 - 39).all()


@pytest.mark.parametrize(
    "masker",
    [RandomMasker(), BlockwiseMasker(), BlockwiseMasker(exact=False), SimMIMMasker(), IBOTMasker()],
    ids=repr,
)
def test_common_api(masker):
    assert masker.grid == (14, 14) and masker.num_patches == 196
    masks = masker(4, generator=torch.Generator().manual_seed(0), device="cpu")
    assert masks.shape == (4, 196) and masks.dtype == torch.bool


def test_ibot_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"pred_ratio=0.1 with pred_ratio_var=0.2"):
        IBOTMasker(pred_ratio=0.1, pred_ratio_var=0.2)
    with pytest.raises(ValueError, match=r"pred_ratio_var"):
        IBOTMasker(pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.1, 0.2))
