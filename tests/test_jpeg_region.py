"""Crop-region JPEG decoding (``mimscale.data._jpeg_region``): bit-identical to slicing a full decode,
every sampling layout and scale, errors instead of crashes, and the transform's fallback without it.

The extension is optional (it needs libjpeg-turbo's headers at install time); where it was not built
these tests skip with that reason, and ``scripts/setup.sh`` says so at install.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from mimscale.data import transforms as tr
from mimscale.data.transforms import RandomResizedCropFlip, crop_params

region = pytest.importorskip(
    "mimscale.data._jpeg_region", reason="C extension not built (libjpeg-turbo headers missing at install)"
)


def _photo(size: tuple[int, int]) -> Image.Image:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(path) as img:
        return img.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def _encode(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _decode(data: bytes, top: int, left: int, h: int, w: int, denom: int = 1) -> np.ndarray:
    buf = np.empty(h * (w + 97) * 3, dtype=np.uint8)
    region.decode_region(data, top, left, h, w, denom, buf, False)
    return buf[: h * w * 3].reshape(h, w, 3)


# Odd sizes (not multiples of the 16-px iMCU) and every chroma layout libjpeg-turbo handles
# differently when cropping: 4:2:0 (h2v2 fancy upsampling), 4:2:2 (h2v1), 4:4:4, grayscale,
# progressive, and restart markers.
CASES = {
    "420": lambda: _encode(_photo((453, 341)), subsampling="4:2:0"),
    "422": lambda: _encode(_photo((341, 453)), subsampling="4:2:2"),
    "444": lambda: _encode(_photo((300, 227)), subsampling="4:4:4"),
    "gray": lambda: _encode(_photo((333, 250)).convert("L")),
    "progressive": lambda: _encode(_photo((401, 299)), subsampling="4:2:0", progressive=True),
}


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("denom", [1, 2, 4])
def test_region_equals_slice_of_full_decode(kind: str, denom: int) -> None:
    """Every pixel of random rectangles (and the edge cases: whole image, corners, one-pixel
    strips, rectangles starting on an iMCU boundary) equals the full decode at that scale."""
    data = CASES[kind]()
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    h, w = -(-height // denom), -(-width // denom)
    if denom == 1:
        full = simplejpeg.decode_jpeg(data, colorspace="RGB")
    else:
        full = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=h, min_width=w)
    assert full.shape[:2] == (h, w)
    boxes = [(0, 0, h, w), (0, 0, 1, 1), (h - 1, w - 1, 1, 1), (0, 16, h, 1), (16, 32, 17, w - 48),
             (h // 3, w // 2, h - h // 3, w - w // 2)]
    rng = np.random.default_rng(denom)
    boxes += [crop_params(h, w, (0.05, 1.0), (0.5, 2.0), rng) for _ in range(25)]
    for top, left, bh, bw in boxes:
        if bh <= 0 or bw <= 0:
            continue
        got = _decode(data, top, left, bh, bw, denom)
        want = full[top : top + bh, left : left + bw]
        np.testing.assert_array_equal(got, want, err_msg=f"{(top, left, bh, bw)}")


def test_bad_input_raises_instead_of_crashing() -> None:
    """Corrupt, truncated and non-JPEG data, and a rectangle outside the image, raise ValueError
    naming the problem; a buffer that is too small raises BufferError. The process survives."""
    data = CASES["420"]()
    buf = np.empty(1 << 20, dtype=np.uint8)
    with pytest.raises(ValueError, match="libjpeg"):
        region.decode_region(b"not a jpeg at all", 0, 0, 4, 4, 1, buf, False)
    with pytest.raises(ValueError, match="libjpeg"):
        region.decode_region(data[: len(data) // 2], 200, 0, 100, 100, 1, buf, False)
    with pytest.raises(ValueError, match="libjpeg"):  # cut short, then an end-of-image marker
        region.decode_region(data[: len(data) // 2] + b"\xff\xd9", 0, 0, 341, 453, 1, buf, False)
    rng = np.random.default_rng(0)
    for _ in range(20):  # damaged entropy-coded data: garbage pixels or ValueError, never a crash
        corrupt = bytearray(data)
        at = int(rng.integers(len(data) // 4, len(data) - 64))
        corrupt[at : at + 32] = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
        try:
            region.decode_region(bytes(corrupt), 10, 20, 300, 400, 1, buf, False)
        except ValueError:
            pass
    with pytest.raises(ValueError, match=r"top=300 left=0 height=100 width=10 lies outside the 341x453"):
        region.decode_region(data, 300, 0, 100, 10, 1, buf, False)
    with pytest.raises(ValueError, match="denom must be 1, 2, 4 or 8, got 3"):
        region.decode_region(data, 0, 0, 10, 10, 3, buf, False)
    with pytest.raises(BufferError, match="output buffer holds 100 bytes"):
        region.decode_region(data, 0, 0, 100, 100, 1, np.empty(100, dtype=np.uint8), False)
    # CMYK JPEGs are refused (PIL decodes them, knowing the Adobe inversion).
    cmyk = _encode(_photo((64, 48)).convert("CMYK"))
    with pytest.raises(ValueError, match="colour space"):
        region.decode_region(cmyk, 0, 0, 8, 8, 1, buf, False)


def test_transform_output_identical_with_and_without_region_decode() -> None:
    """The single-view crop decodes only the rectangle; its uint8 output equals the whole-image
    decode path bit for bit (same draws, same box, same flip)."""
    datas = [CASES[k]() for k in ("420", "422", "progressive", "gray")]
    for size, scale in [(224, (0.2, 1.0)), (96, (0.05, 0.4)), (64, (0.5, 1.0))]:
        t = RandomResizedCropFlip(size, scale=scale)
        for i, data in enumerate(datas):
            for seed in range(6):
                with_region = t(tr._Source(data, region=True), np.random.default_rng([i, seed]))
                without = t(tr._Source(data, region=False), np.random.default_rng([i, seed]))
                np.testing.assert_array_equal(with_region, without)


def test_single_view_decodes_only_the_crop_and_reports_the_library() -> None:
    """The transform really takes the region path for a single view (no whole-image simplejpeg
    decode), and the build reports which libjpeg it uses."""
    assert tr.REGION_DECODE is not None and tr.REGION_DECODE.startswith("libjpeg")
    data = CASES["420"]()
    calls = []
    orig = tr.simplejpeg.decode_jpeg
    tr.simplejpeg.decode_jpeg = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        for seed in range(10):
            RandomResizedCropFlip(224, scale=(0.2, 1.0))(data, np.random.default_rng(seed))
    finally:
        tr.simplejpeg.decode_jpeg = orig
    assert calls == []


def test_corrupt_jpeg_falls_back_to_pil_like_before(tmp_path: Path) -> None:
    """A JPEG libjpeg-turbo's strict mode refuses (stray bytes before a marker) still goes through PIL,
    exactly as with the whole-image path."""
    data = CASES["420"]()
    sos = data.index(b"\xff\xda")
    stray = data[:sos] + b"\x00\x00\x00" + data[sos:]  # "extraneous bytes before marker": a warning
    t = RandomResizedCropFlip(64, scale=(0.5, 1.0))
    with_region = t(tr._Source(stray, region=True), np.random.default_rng(0))
    without = t(tr._Source(stray, region=False), np.random.default_rng(0))
    np.testing.assert_array_equal(with_region, without)
