"""uint8 image augmentations that run in the data workers and never build float tensors.

Every per-sample transform here takes the *encoded* image bytes and a ``numpy.random.Generator``
and returns a ``uint8`` array of shape ``[3, H, W]`` (or a tuple of such arrays for multi-view
methods) whose memory is interleaved RGB, i.e. channels-last strides ``(1, 3 * W, 3)``: the resize
kernel writes that layout natively (asking it for planar CHW costs a scalar repacking pass, 30% of
the resize), and the loader stacks it into a channels-last batch. Normalisation to float, and the
switch to contiguous NCHW, happen once per batch on the training device
(:func:`mimscale.data.pipeline.normalize_on_device`), which keeps worker CPU and host-to-device
traffic at one byte per pixel.

The crop, :class:`RandomResizedCropFlip`, reproduces torchvision's ``RandomResizedCrop`` sampling
exactly but samples the crop box *before* decoding: for JPEG input it reads only the header, picks
the box, and then decodes **only the box** with libjpeg-turbo (the C extension
:mod:`mimscale.data._jpeg_region`: rows above it are entropy-decoded and skipped, columns beside it
are never transformed, nothing below it is read; the pixels are bit-identical to slicing a full
decode) into a reused per-thread buffer. It resizes with PyTorch's vectorised uint8 antialiased
bicubic kernel (the filter of PIL's ``BICUBIC``, which torchvision's PIL path uses), writing CHW
directly. When the box spans at least twice the output, the decode uses libjpeg's DCT scaling at
1/2, 1/4 or 1/8 instead (a 1024x768 photo going to 224 decodes 4x fewer pixels) and PIL resizes the
then fractional box. Without the extension (no libjpeg-turbo headers at install; see
:data:`REGION_DECODE`) the whole image is decoded with simplejpeg and the box cut from it: the same
output, ~20% more decoding. ``benchmarks/data_pipeline.py`` measures the pipeline against the
official torchvision path and against plain decoding.

Colour operations (:class:`ColorJitter`, :class:`Grayscale`, :class:`Solarize`,
:class:`GaussianBlur`, :class:`RandomChoice`) act on the RGB PIL image between the crop and the
final array conversion; :class:`View` chains a crop with such operations, :class:`Views` runs
several views on the same bytes (iBOT's global and local crops, LUT's second augmented view).

Configuration schema for :func:`build_transform`
------------------------------------------------
A method declares its input pipeline as plain data: one *view dict*, or a list of view dicts
(then the transform returns a tuple, one array per view, in list order). A view dict has these
keys, all optional::

    size:         int or [height, width]            output size (default 224)
    scale:        [lo, hi]                          crop area fraction range (default [0.2, 1.0])
    ratio:        [lo, hi]                          crop aspect (w/h) range (default [0.75, 1.3333])
    hflip:        float                             horizontal flip probability (default 0.5)
    dct_margin:   float >= 1                        JPEG reduced-decode margin (default 1.0, see
                                                    RandomResizedCropFlip)
    fast_decode:  bool                              libjpeg-turbo fast IDCT + upsampling (default
                                                    false, see RandomResizedCropFlip)
    color_jitter: true | false | null | dict        dict keys: brightness, contrast, saturation,
                                                    hue, p (defaults 0.4, 0.4, 0.2, 0.1, 0.8);
                                                    true means the defaults
    grayscale:    float | dict                      probability, or {"p": ...}
    blur:         float | dict                      probability, or {"p": ..., "sigma": [lo, hi]}
                                                    (sigma default [0.1, 2.0])
    solarize:     float | dict                      probability, or {"p": ..., "threshold": 128}
    one_of:       list | dict                       a list of single-operation dicts (each holding
                                                    one of color_jitter, grayscale, blur, solarize),
                                                    one of which is drawn uniformly per sample; or
                                                    {"choices": [...], "p": float} to apply the
                                                    draw only with probability p
    repeat:       int                               in a list only: this view appears N times
                                                    (e.g. iBOT's local crops); 0 removes it

Colour operations run in this fixed order after the crop and flip: color_jitter, grayscale, blur,
solarize, one_of. Unknown keys raise ``ValueError`` naming the key and the allowed ones, so a typo
in a recipe fails at start-up instead of silently training without an augmentation.

Examples::

    build_transform({"size": 224, "scale": [0.2, 1.0]})                      # MAE
    build_transform([{"size": 224, "scale": [0.25, 1.0], "repeat": 2},
                     {"size": 96, "scale": [0.05, 0.25], "repeat": 10}])      # iBOT (crops only)
    build_transform([{"size": 224},
                     {"size": 224, "color_jitter": True,
                      "one_of": [{"grayscale": 1.0}, {"solarize": 1.0}, {"blur": 1.0}]}])  # LUT
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

__all__ = [
    "RandomResizedCropFlip",
    "ColorJitter",
    "Grayscale",
    "Solarize",
    "GaussianBlur",
    "RandomChoice",
    "View",
    "Views",
    "build_transform",
    "crop_params",
    "to_chw",
    "is_channels_last",
]

_JPEG_MAGIC = b"\xff\xd8"
# Header colour spaces libjpeg-turbo converts to RGB correctly by itself; CMYK/YCCK (Adobe) JPEGs
# are stored inverted and go through PIL, which knows about the Adobe marker.
_FAST_COLORSPACES = {"YCbCr", "Gray", "RGB"}

# Smallest DCT reduction worth decoding at (2 = 1/2 scale): see _Source.decode.
MIN_DCT_DENOM = 2

PixelOp = Callable[[Image.Image, np.random.Generator], Image.Image]

try:  # the optional C extension (setup.py); without libjpeg-turbo's headers at install time it is absent
    from mimscale.data import _jpeg_region
except ImportError:  # pragma: no cover - depends on the build machine
    _jpeg_region = None

#: The libjpeg the crop-region decoder was built against (e.g. ``"libjpeg-turbo 2.1.5"``), or None
#: when the extension is not built and single-view crops decode the whole image with simplejpeg.
REGION_DECODE: str | None = _jpeg_region.libjpeg_version() if _jpeg_region is not None else None


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair [lo, hi], got {value!r}") from None
    if lo > hi:
        raise ValueError(f"{name} must satisfy lo <= hi, got {value!r}")
    return lo, hi


def _size(value: Any) -> tuple[int, int]:
    """Normalise ``size`` to (height, width)."""
    if isinstance(value, int | np.integer):
        h = w = int(value)
    else:
        try:
            h, w = (int(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"size must be an int or [height, width], got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return h, w


def _prob(value: Any, name: str) -> float:
    p = float(value)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} probability must be in [0, 1], got {value!r}")
    return p


def crop_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """Sample a crop box ``(top, left, h, w)`` with torchvision's RandomResizedCrop semantics.

    Ten tries of area ~ U(scale) * area and log-aspect ~ U(log ratio); the first box that fits
    wins, with its top-left corner uniform over valid positions. If none fits, the whole image
    is used, centre-cropped to the nearest allowed aspect ratio. Kept as a free function so the
    sampling can be tested against ``torchvision.transforms.RandomResizedCrop.get_params``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_chw(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 array of shape [3, H, W] with channels-last strides (one copy, no float).

    The pixels stay interleaved as PIL holds them (see the module docstring): a planar copy would
    cost a byte shuffle per pixel here and be undone by the channels-last batch.
    """
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def is_channels_last(array: np.ndarray) -> bool:
    """True for a ``[C, H, W]`` array whose memory is interleaved ``[H, W, C]`` (as :func:`to_chw`
    returns)."""
    return (
        array.ndim == 3
        and array.strides[0] == array.itemsize
        and array.strides[2] == array.shape[0] * array.itemsize
        and array.strides[1] == array.shape[2] * array.strides[2]
    )


def _dct_scale(full: int, reduced: int) -> float:
    """Exact libjpeg scale M/8 that turned ``full`` pixels into ``reduced`` (ceil rounding)."""
    for m in range(1, 17):
        if -(-full * m // 8) == reduced:
            return m / 8
    return reduced / full


def resize_crop_uint8(
    src: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop ``box = (top, left, h, w)`` of an HWC uint8 image and resize it to ``size = (H, W)``.

    Antialiased bicubic (Keys a = -0.5, support scaled with the reduction), the filter PIL's
    ``resize(BICUBIC)`` and hence torchvision's PIL path use, computed by PyTorch's uint8 kernel,
    which is vectorised (AVX2 on x86) and about 4x faster than PIL's on one core. Returns a
    ``[3, H, W]`` uint8 tensor with channels-last strides (``out`` when given: a ``[3, H, W]``
    channels-last view, e.g. a batch slot); ``src`` is not modified and not referenced afterwards.

    The crop is first copied into a packed HWC block (row copies): the kernel reads its input several
    times and runs faster on packed rows than on a strided view of the whole image.
    """
    top, left, h, w = box
    return _resize_hwc(np.ascontiguousarray(src[top : top + h, left : left + w]), size, out)


def _resize_hwc(crop: np.ndarray, size: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
    """Resize an HWC uint8 array (a view is fine) to ``size``: a ``[3, H, W]`` uint8 tensor whose
    memory is HWC (channels-last strides), not referencing ``crop``; written into ``out`` if given."""
    out_h, out_w = int(size[0]), int(size[1])
    if tuple(crop.shape[:2]) == (out_h, out_w):
        if out is not None:
            return out.copy_(torch.from_numpy(crop).permute(2, 0, 1))
        return torch.from_numpy(np.array(crop, copy=True)).permute(2, 0, 1)
    # numpy views are ~30x cheaper than torch view ops, which add up at ~1000 images/s per core.
    x = torch.from_numpy(crop.transpose(2, 0, 1)[None])
    # An interleaved (channels-last) output lets the kernel skip its scalar planar repacking pass:
    # measured 160 vs 230 us for a 300x290 crop to 224x224 on one core.
    if out is None:
        out = torch.empty((1, out_h, out_w, 3), dtype=torch.uint8).permute(0, 3, 1, 2)[0]
    _upsample_bicubic_aa(x, (out_h, out_w), out[None])
    return out


def _upsample_bicubic_aa(x: torch.Tensor, size: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bicubic", antialias=True)`` into ``out``, without its Python
    argument checks."""
    try:
        return torch._C._nn._upsample_bicubic2d_aa(x, size, False, out=out)
    except (AttributeError, TypeError, RuntimeError):  # private binding moved: take the public door
        return out.copy_(F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False))


_DECODE_BUFFER = threading.local()


def _decode_buffer(nbytes: int) -> np.ndarray:
    """A per-thread scratch buffer for decoded images, grown on demand.

    Saves allocating (and first touching) ~0.5 MB per ImageNet image; a small gain (1-2% of the
    pipeline's time, measured interleaved). Every crop is copied out of the decoded image before the
    next sample, so one reused buffer per worker thread is enough.
    """
    buf = getattr(_DECODE_BUFFER, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
        _DECODE_BUFFER.buf = buf
    return buf


class _Source:
    """The encoded bytes of one sample and what has been decoded from them so far.

    :class:`Views` hands one source to all its views, so an image is decoded once per sample (or
    once per DCT scale) however many crops are cut from it; iBOT's 2 + 10 crops used to decode it
    12 times.
    """

    __slots__ = ("data", "_header", "_decoded", "_decoded_pil", "_pil", "fast", "fast_decode", "region")

    def __init__(self, data: bytes, fast_decode: bool = False, region: bool = True) -> None:
        self.data = data
        self.fast_decode = fast_decode
        # Decode only each crop's rectangle (one view per sample); several views share one decode.
        self.region = region and _jpeg_region is not None
        self._header: tuple[int, int] | None = None
        self._decoded: tuple[np.ndarray, float, float] | None = None  # (HWC array, scale y, scale x)
        self._decoded_pil: Image.Image | None = None
        self._pil: Image.Image | None = None
        # None: not yet known; False: not a JPEG libjpeg-turbo decodes by itself (PIL decides).
        self.fast: bool | None = None if data[:2] == _JPEG_MAGIC else False

    def jpeg_size(self) -> tuple[int, int] | None:
        """(height, width) from the JPEG header, or None when the PIL path must decode."""
        if self.fast is False:
            return None
        if self._header is None:
            try:
                height, width, colorspace, _ = simplejpeg.decode_jpeg_header(self.data)
            except ValueError:
                self.fast = False
                return None
            if colorspace not in _FAST_COLORSPACES:
                self.fast = False
                return None
            self._header = (height, width)
        return self._header

    def dct_denom(self, min_h: int, min_w: int) -> int:
        """The largest power-of-two DCT reduction (1, 2, 4, 8) that keeps ``min_h`` x ``min_w`` pixels.

        Only 1/2, 1/4 and 1/8 are used: libjpeg-turbo has SIMD inverse DCTs for those, while its
        5/8..7/8 scales run plain C and decode *slower* than full size (measured: 7/8 takes 1.5x
        the time of 8/8 on ImageNet-sized photos).
        """
        height, width = self._header  # type: ignore[misc]
        for d in (8, 4, 2):
            if d >= MIN_DCT_DENOM and -(-height // d) >= min_h and -(-width // d) >= min_w:
                return d
        return 1

    def decode_region(self, top: int, left: int, h: int, w: int, denom: int) -> np.ndarray:
        """RGB pixels ``[top:top+h, left:left+w]`` of the image decoded at scale ``1/denom``.

        Decodes only that rectangle (:mod:`mimscale.data._jpeg_region`: rows above it are entropy
        decoded and skipped, columns outside it are not transformed, nothing below it is read),
        bit-identical to slicing a full decode. Returns a packed HWC view into the per-thread
        scratch buffer, valid until the next decode in this thread. Raises ``ValueError`` for files PIL
        must handle.
        """
        height, width = self._header  # type: ignore[misc]
        # jpeg_crop_scanline widens each decoded row by up to three iMCU columns (<= 32 px each).
        buf = _decode_buffer(h * min(w + 97, -(-width // denom)) * 3)
        try:
            _jpeg_region.decode_region(self.data, top, left, h, w, denom, buf, self.fast_decode)
        except ValueError:
            self.fast = False
            raise
        self.fast = True
        self._decoded = None  # the scratch buffer now holds this rectangle
        self._decoded_pil = None
        return buf[: h * w * 3].reshape(h, w, 3)

    def decode(self, min_h: int, min_w: int) -> tuple[np.ndarray, float, float]:
        """RGB decode of the whole image at the smallest power-of-two DCT scale (:meth:`dct_denom`)
        that is at least ``min_h`` x ``min_w``.

        A decode already made for another view is reused when it is large enough. Raises
        ``ValueError`` (libjpeg-turbo strict mode) for files PIL must handle.
        """
        height, width = self._header  # type: ignore[misc]
        denom = self.dct_denom(min_h, min_w)
        want_h, want_w = -(-height // denom), -(-width // denom)
        if self._decoded is not None:
            arr = self._decoded[0]
            if arr.shape[0] >= want_h and arr.shape[1] >= want_w:
                return self._decoded
        fast = self.fast_decode
        # One decoded image per sample lives in the scratch buffer (a second view of the same sample
        # needing a larger scale replaces it: the earlier views are finished by then).
        buf = _decode_buffer(want_h * want_w * 3)
        try:
            if denom > 1:
                arr = simplejpeg.decode_jpeg(self.data, colorspace="RGB", min_height=want_h, min_width=want_w,
                                             fastdct=fast, fastupsample=fast, buffer=buf)
            else:
                arr = simplejpeg.decode_jpeg(self.data, colorspace="RGB", fastdct=fast, fastupsample=fast,
                                             buffer=buf)
        except ValueError:
            self.fast = False
            raise
        self.fast = True
        rh, rw = arr.shape[:2]
        self._decoded = (arr, _dct_scale(height, rh), _dct_scale(width, rw))
        self._decoded_pil = None
        return self._decoded

    def decoded_pil(self) -> Image.Image:
        """The current reduced decode as a PIL image (made once, for fractional crop boxes)."""
        if self._decoded_pil is None:
            self._decoded_pil = Image.fromarray(self._decoded[0])  # type: ignore[index]
        return self._decoded_pil

    def pil(self) -> Image.Image:
        """Full RGB decode by PIL: PNG, WebP, CMYK JPEGs, files libjpeg-turbo's strict mode refuses."""
        if self._pil is None:
            with Image.open(io.BytesIO(self.data)) as src:
                self._pil = src.convert("RGB")
        return self._pil


class RandomResizedCropFlip:
    """RandomResizedCrop (torchvision semantics, bicubic) plus horizontal flip, on encoded bytes.

    ``__call__(data, rng)`` returns a uint8 array [3, H, W] with channels-last strides (see the
    module docstring), :meth:`write` puts the same into a batch slot, and :meth:`crop_image` returns
    the RGB PIL image so that :class:`View` can chain colour operations before the conversion.

    The crop box is drawn from the JPEG header before anything is decoded. Then:

    * If the box spans at least twice the output, the JPEG is decoded at a reduced libjpeg DCT
      scale (1/2, 1/4 or 1/8) and the box, now fractional, is resized by PIL, which takes
      fractional boxes.
    * Otherwise (typical ImageNet images going to 224) only the box is decoded, at full scale
      (:meth:`_Source.decode_region`; under :class:`Views` the image is decoded once and every
      view's box cut from it), and resized by PyTorch's vectorised uint8 antialiased bicubic (no
      PIL image and no float array).

    ``dct_margin``: the JPEG is decoded at the smallest libjpeg scale (1/2, 1/4, 1/8) at which the
    crop box still spans ``dct_margin`` x the output size. 1.0 is fastest; at 1/8 scale libjpeg keeps only
    each block's mean (a box filter), which differs from a full-resolution antialiased bicubic
    resize by a few grey levels at sharp edges. 2.0 (the margin Pillow's ``thumbnail`` uses) makes
    the result practically identical to a full decode at some of the speed.

    ``fast_decode``: libjpeg-turbo's fast integer IDCT and merged (replicating) chroma upsampling,
    about 10% faster decoding; the 224 px crops then differ from an accurate decode by about one
    grey level on average (JPEG q90 noise is a few levels). Off by default.
    """

    def __init__(
        self,
        size: int | Sequence[int] = 224,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        dct_margin: float = 1.0,
        fast_decode: bool = False,
    ) -> None:
        self.size = _size(size)
        self.scale = _pair(scale, "scale")
        self.ratio = _pair(ratio, "ratio")
        if not 0.0 < self.scale[1] <= 1.0 or self.scale[0] < 0.0:
            raise ValueError(f"scale must lie in [0, 1] with hi > 0, got {tuple(scale)!r}")
        if self.ratio[0] <= 0.0:
            raise ValueError(f"ratio must be positive, got {tuple(ratio)!r}")
        self.hflip = _prob(hflip, "hflip")
        if dct_margin < 1.0:
            raise ValueError(f"dct_margin must be >= 1.0, got {dct_margin!r}")
        self.dct_margin = float(dct_margin)
        self.fast_decode = bool(fast_decode)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip={self.hflip}, dct_margin={self.dct_margin}, fast_decode={self.fast_decode})"
        )

    # -- the crop, before the flip ------------------------------------------------------------------
    def _crop(
        self, src: _Source, rng: np.random.Generator, out: torch.Tensor | None = None
    ) -> torch.Tensor | Image.Image:
        """Crop and resize (no flip): a channels-last [3, H, W] uint8 tensor (``out`` itself where the
        fast path could write into it) or an RGB PIL image."""
        if src.jpeg_size() is not None:
            try:
                return self._crop_jpeg(src, rng, out)
            except ValueError:
                # libjpeg-turbo in strict mode refuses anything it had to warn about (stray bytes,
                # unsupported variants); PIL decides those, exactly as a torchvision pipeline would.
                pass
        return self._crop_pil(src, rng)

    def _crop_jpeg(
        self, src: _Source, rng: np.random.Generator, out: torch.Tensor | None = None
    ) -> torch.Tensor | Image.Image:
        """Fast path: header -> crop box -> (DCT-scaled) decode -> one resize."""
        height, width = src.jpeg_size()  # type: ignore[misc]
        out_h, out_w = self.size
        top, left, h, w = crop_params(height, width, self.scale, self.ratio, rng)
        # Smallest DCT scale whose reduced image still gives the crop >= margin x output.
        min_h = math.ceil(self.dct_margin * out_h * height / h)
        min_w = math.ceil(self.dct_margin * out_w * width / w)
        if src.region and src.dct_denom(min_h, min_w) == 1:
            # Decode just the crop: the same pixels as slicing a full decode, ~25% less decoding.
            # (At reduced DCT scales the whole reduced image is decoded: it is already small, and
            # PIL's fractional-box resize there depends on the pixels around the box.)
            return _resize_hwc(src.decode_region(top, left, h, w, 1), self.size, out)
        arr, sy, sx = src.decode(min_h, min_w)
        rh, rw = arr.shape[:2]
        if (rh, rw) == (height, width):
            return resize_crop_uint8(arr, (top, left, h, w), self.size, out)
        # Reduced decode: the box is fractional there, and PIL's resize takes fractional boxes
        # (rounding it to whole reduced pixels would shift sharp edges by up to half an output pixel).
        box = (left * sx, top * sy, min((left + w) * sx, rw), min((top + h) * sy, rh))
        return src.decoded_pil().resize((out_w, out_h), Image.Resampling.BICUBIC, box=box)

    def _crop_pil(self, src: _Source, rng: np.random.Generator) -> Image.Image:
        """Any format PIL reads (PNG, WebP, CMYK JPEG, ...): full decode, then the same crop."""
        out_h, out_w = self.size
        img = src.pil()
        top, left, h, w = crop_params(img.height, img.width, self.scale, self.ratio, rng)
        return img.resize((out_w, out_h), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))

    def _flips(self, rng: np.random.Generator) -> bool:
        return self.hflip > 0.0 and rng.random() < self.hflip

    # -- public entry points ----------------------------------------------------------------------
    def crop_image(self, data: bytes | _Source, rng: np.random.Generator) -> Image.Image:
        """Decode, crop, resize and maybe flip; returns an RGB PIL image of ``size``."""
        src = data if isinstance(data, _Source) else _Source(data, self.fast_decode)
        out = self._crop(src, rng)
        img = Image.fromarray(out.permute(1, 2, 0).numpy()) if isinstance(out, torch.Tensor) else out
        if self._flips(rng):
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def __call__(self, data: bytes | _Source, rng: np.random.Generator) -> np.ndarray:
        src = data if isinstance(data, _Source) else _Source(data, self.fast_decode)
        out = self._crop(src, rng)
        flip = self._flips(rng)
        if isinstance(out, Image.Image):
            return to_chw(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out)
        return (out.flip(-1) if flip else out).numpy()

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """``(3, H, W)``: what :meth:`write` fills (the loader preallocates batches of it)."""
        return (3, *self.size)

    def write(self, data: bytes | _Source, rng: np.random.Generator, out: torch.Tensor) -> None:
        """``out[...] = self(data, rng)``, the same values from the same draws, without the copy.

        ``out`` is a ``[3, H, W]`` uint8 tensor, typically one slot of a channels-last batch: the
        loader's batches are filled this way, so the JPEG fast path resizes straight into shared
        memory (saving an allocation and a copy per image, ~3% of the pipeline on one core).
        """
        if out.dtype != torch.uint8 or tuple(out.shape) != self.output_shape:
            raise ValueError(
                f"write needs a uint8 tensor of shape {self.output_shape}, got {out.dtype} {tuple(out.shape)}"
            )
        src = data if isinstance(data, _Source) else _Source(data, self.fast_decode)
        res = self._crop(src, rng, out)
        flip = self._flips(rng)
        if isinstance(res, Image.Image):
            np.copyto(out.numpy(), to_chw(res.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else res))
        elif flip:
            out.copy_(res.flip(-1))  # flip() makes a new tensor first, so res may be out itself
        elif res is not out:
            out.copy_(res)


def _shift_hue(img: Image.Image, hue: float) -> Image.Image:
    """Rotate the hue channel by ``hue`` turns (in [-0.5, 0.5]) with uint8 wrap-around, as torchvision."""
    shift = int(round(hue * 255)) % 256
    if shift == 0:
        return img
    h, s, v = img.convert("HSV").split()
    h = h.point([(i + shift) % 256 for i in range(256)])
    return Image.merge("HSV", (h, s, v)).convert("RGB")


class ColorJitter:
    """torchvision-style ColorJitter on uint8 RGB, applied with probability ``p``.

    Factors: brightness/contrast/saturation ~ U(max(0, 1-x), 1+x), hue ~ U(-hue, hue); the four
    adjustments run in a random order, as in torchvision (and BYOL/iBOT/LUT recipes built on it).
    """

    def __init__(
        self,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        p: float = 0.8,
    ) -> None:
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue!r}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.p = _prob(p, "color_jitter")

    def __repr__(self) -> str:
        return (
            f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, hue={self.hue}, p={self.p})"
        )

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() >= self.p:
            return img
        order = rng.permutation(4)
        b = rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness) if self.brightness else None
        c = rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast) if self.contrast else None
        s = rng.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation) if self.saturation else None
        h = rng.uniform(-self.hue, self.hue) if self.hue else None
        for i in order:
            if i == 0 and b is not None:
                img = ImageEnhance.Brightness(img).enhance(b)
            elif i == 1 and c is not None:
                img = ImageEnhance.Contrast(img).enhance(c)
            elif i == 2 and s is not None:
                img = ImageEnhance.Color(img).enhance(s)
            elif i == 3 and h is not None:
                img = _shift_hue(img, h)
        return img


class Grayscale:
    """With probability ``p``, replace the image by its luma, kept as 3 channels."""

    def __init__(self, p: float = 0.2) -> None:
        self.p = _prob(p, "grayscale")

    def __repr__(self) -> str:
        return f"Grayscale(p={self.p})"

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() < self.p:
            return img.convert("L").convert("RGB")
        return img


class Solarize:
    """With probability ``p``, invert every pixel value >= ``threshold`` (torchvision/PIL semantics)."""

    def __init__(self, threshold: int = 128, p: float = 0.2) -> None:
        if not 0 <= threshold <= 256:
            raise ValueError(f"solarize threshold must be in [0, 256], got {threshold!r}")
        self.threshold = int(threshold)
        self.p = _prob(p, "solarize")

    def __repr__(self) -> str:
        return f"Solarize(threshold={self.threshold}, p={self.p})"

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() < self.p:
            return ImageOps.solarize(img, self.threshold)
        return img


class GaussianBlur:
    """With probability ``p``, PIL Gaussian blur with radius ~ U(sigma), as in BYOL/DINO/iBOT."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0), p: float = 0.5) -> None:
        self.sigma = _pair(sigma, "blur sigma")
        if self.sigma[0] < 0:
            raise ValueError(f"blur sigma must be >= 0, got {tuple(sigma)!r}")
        self.p = _prob(p, "blur")

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma}, p={self.p})"

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() < self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.sigma)))
        return img


class RandomChoice:
    """With probability ``p``, apply one of ``ops`` drawn uniformly (e.g. LUT's grayscale/solarize/blur)."""

    def __init__(self, ops: Sequence[PixelOp], p: float = 1.0) -> None:
        if len(ops) == 0:
            raise ValueError("RandomChoice needs at least one operation")
        self.ops = list(ops)
        self.p = _prob(p, "one_of")

    def __repr__(self) -> str:
        return f"RandomChoice({self.ops!r}, p={self.p})"

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() >= self.p:
            return img
        return self.ops[int(rng.integers(len(self.ops)))](img, rng)


class View:
    """One augmented view: a crop+flip followed by colour operations, returned as uint8 [3, H, W]
    (channels-last strides, as :func:`to_chw`)."""

    def __init__(self, crop: RandomResizedCropFlip, ops: Sequence[PixelOp] = ()) -> None:
        self.crop = crop
        self.ops = list(ops)

    @property
    def size(self) -> tuple[int, int]:
        return self.crop.size

    def __repr__(self) -> str:
        return f"View({self.crop!r}, ops={self.ops!r})"

    def __call__(self, data: bytes | _Source, rng: np.random.Generator) -> np.ndarray:
        img = self.crop.crop_image(data, rng)
        for op in self.ops:
            img = op(img, rng)
        return to_chw(img)


class Views:
    """Several views of the same encoded image; returns a tuple of uint8 [3, H, W] arrays in order.

    Views may have different sizes (iBOT: 2 x 224 global + N x 96 local); the loader stacks each
    view position separately, so a batch carries one tensor per view. The image is decoded once
    and shared by the views built here (:class:`RandomResizedCropFlip`, :class:`View`); a view
    decodes again only when it needs a larger DCT scale than the views before it.
    """

    def __init__(self, views: Sequence[Callable[[bytes, np.random.Generator], np.ndarray]]) -> None:
        if len(views) == 0:
            raise ValueError("Views needs at least one view")
        self.views = list(views)

    def __len__(self) -> int:
        return len(self.views)

    def __repr__(self) -> str:
        return f"Views({self.views!r})"

    def __call__(self, data: bytes, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        crops = [v if isinstance(v, RandomResizedCropFlip) else getattr(v, "crop", None) for v in self.views]
        # One view: decode just its crop. Several: decode the image once and cut every crop from it.
        src = _Source(data, any(c is not None and c.fast_decode for c in crops), region=len(self.views) == 1)
        return tuple(
            view(src if isinstance(view, RandomResizedCropFlip | View) else data, rng) for view in self.views
        )


_CROP_KEYS = ("size", "scale", "ratio", "hflip", "dct_margin", "fast_decode")
_OP_KEYS = ("color_jitter", "grayscale", "blur", "solarize", "one_of")
_VIEW_KEYS = _CROP_KEYS + _OP_KEYS
_JITTER_KEYS = ("brightness", "contrast", "saturation", "hue", "p")


def _check_keys(cfg: dict, allowed: Sequence[str], where: str) -> None:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} must be a dict, got {type(cfg).__name__}: {cfg!r}")
    for key in cfg:
        if key not in allowed:
            raise ValueError(f"unknown key {key!r} in {where}; allowed keys: {', '.join(allowed)}")


def _prob_or_dict(value: Any, name: str, extra: Sequence[str]) -> dict:
    """``0.2`` -> {"p": 0.2}; dicts are checked against ``p`` plus ``extra``."""
    if isinstance(value, dict):
        _check_keys(value, ("p", *extra), f"{name!r} options")
        return dict(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a probability or a dict, got {value!r}")
    return {"p": float(value)}


def _build_op(name: str, value: Any) -> PixelOp | None:
    if value is None or value is False:
        return None
    if name == "color_jitter":
        if value is True:
            return ColorJitter()
        _check_keys(value, _JITTER_KEYS, "'color_jitter' options")
        return ColorJitter(**value)
    if name == "grayscale":
        return Grayscale(**_prob_or_dict(value, name, ()))
    if name == "blur":
        return GaussianBlur(**_prob_or_dict(value, name, ("sigma",)))
    if name == "solarize":
        return Solarize(**_prob_or_dict(value, name, ("threshold",)))
    if name == "one_of":
        p = 1.0
        choices = value
        if isinstance(value, dict):
            _check_keys(value, ("choices", "p"), "'one_of' options")
            choices, p = value.get("choices", []), value.get("p", 1.0)
        if not isinstance(choices, list | tuple) or not choices:
            raise ValueError(f"one_of needs a non-empty list of single-operation dicts, got {value!r}")
        ops = []
        for choice in choices:
            _check_keys(choice, _OP_KEYS[:-1], "a 'one_of' choice")
            if len(choice) != 1:
                raise ValueError(f"each 'one_of' choice must hold exactly one operation, got {choice!r}")
            ((op_name, op_value),) = choice.items()
            op = _build_op(op_name, op_value)
            if op is not None:
                ops.append(op)
        return RandomChoice(ops, p=p)
    raise AssertionError(name)


def _build_view(cfg: dict) -> RandomResizedCropFlip | View:
    _check_keys(cfg, _VIEW_KEYS, "a view config")
    crop = RandomResizedCropFlip(**{k: cfg[k] for k in _CROP_KEYS if k in cfg})
    ops = [op for name in _OP_KEYS if (op := _build_op(name, cfg.get(name))) is not None]
    return View(crop, ops) if ops else crop


def build_transform(
    cfg: dict | Sequence[dict],
) -> RandomResizedCropFlip | View | Views:
    """Build the per-sample transform a method declares in its recipe (schema in the module doc).

    A dict gives a single-view transform returning one array; a list gives a :class:`Views`
    returning a tuple (even for one entry, so multi-view methods always see a tuple).
    """
    if isinstance(cfg, dict):
        return _build_view(cfg)
    if not isinstance(cfg, list | tuple):
        raise ValueError(f"transform config must be a dict or a list of dicts, got {cfg!r}")
    views: list[RandomResizedCropFlip | View] = []
    for entry in cfg:
        if not isinstance(entry, dict):
            raise ValueError(f"each view config must be a dict, got {entry!r}")
        entry = dict(entry)
        repeat = entry.pop("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 0:
            raise ValueError(f"repeat must be an int >= 0, got {repeat!r}")
        view = _build_view(entry)
        views.extend([view] * repeat)
    return Views(views)
