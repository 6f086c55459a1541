"""JPEG decoding on the GPU (nvJPEG through ``torchvision.io.decode_jpeg``), crop and resize there.

When the host's cores cannot keep up with the accelerator (ViT-L MAE eats thousands of images per
second per GPU), the data workers can skip the pixel work entirely:

* worker side, :class:`JpegCropSampler` (a drop-in transform for ``build_train_loader``): reads the
  JPEG header, draws the RandomResizedCrop box and the flip with exactly the same sampling (and the
  same random stream) as :class:`~mimscale.data.transforms.RandomResizedCropFlip`, and returns an
  :class:`EncodedSample` holding the *encoded* bytes. The collate packs a batch into one
  :class:`EncodedBatch` (all JPEG bytes back to back in one uint8 tensor, plus boxes and flips), so
  a batch crosses process boundaries as a handful of tensors, about 10x smaller than the pixels.
* device side, :class:`GpuJpegDecoder`: one batched ``decode_jpeg(list, device="cuda")`` call,
  then per image the crop (a view), an antialiased bicubic resize
  (``F.interpolate(mode="bicubic", antialias=True)``, Keys a = -0.5 like PIL), rounding to uint8
  and the flip. It returns ``uint8 [B, 3, H, W]`` on the device, ready for
  :func:`~mimscale.data.pipeline.normalize_on_device`.

Files the GPU path cannot take (PNG, WebP, CMYK/YCCK JPEGs, headers simplejpeg cannot read) are
decoded and cropped in the worker by the CPU path and travel as pixels inside the same batch; a
JPEG that nvJPEG rejects at decode time is decoded on the CPU by PIL and cropped on the device.

Single-view only (MAE, SimMIM, BEiT, data2vec recipes); multi-view methods keep the CPU path.

Usage (the loop's side)::

    loader = build_train_loader(urls, JpegCropSampler(224, scale=(0.2, 1.0)), batch_size, ...)
    decoder = GpuJpegDecoder("cuda")
    for batch in loader:
        images = normalize_on_device(decoder(batch.images), "cuda", torch.bfloat16)
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from mimscale.data.transforms import (
    _FAST_COLORSPACES,
    _JPEG_MAGIC,
    RandomResizedCropFlip,
    _check_keys,
    crop_params,
)

__all__ = ["EncodedBatch", "EncodedSample", "GpuJpegDecoder", "JpegCropSampler", "build_gpu_decode_transform"]


@dataclass
class EncodedSample:
    """One sample as a worker ships it for GPU decoding.

    data: the JPEG bytes (None when ``image`` holds a CPU-decoded crop instead).
    box: ``(top, left, h, w)`` crop in full-resolution pixels of the JPEG.
    flip: mirror the crop horizontally.
    size: output ``(H, W)``.
    image: uint8 [3, H, W] already cropped, resized and flipped on the CPU (non-JPEG input).
    """

    data: bytes | None
    box: tuple[int, int, int, int]
    flip: bool
    size: tuple[int, int]
    image: np.ndarray | None = None


@dataclass
class EncodedBatch:
    """A batch of encoded samples; a few tensors, cheap to send from a worker and to pin.

    data: uint8 [total_bytes], the JPEGs back to back; ``offsets`` int64 [B + 1] delimits them
        (an empty range for samples in ``cpu_index``).
    boxes: int64 [B, 4] ``(top, left, h, w)``; flips: bool [B].
    cpu_index: int64 [K] samples already decoded on the CPU, with pixels ``cpu_images`` uint8
        [K, 3, H, W].
    size: output ``(H, W)``.
    """

    data: torch.Tensor
    offsets: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    cpu_index: torch.Tensor
    cpu_images: torch.Tensor
    size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @staticmethod
    def collate(samples: Sequence[EncodedSample]) -> EncodedBatch:
        if not samples:
            raise ValueError("empty batch")
        size = samples[0].size
        if any(s.size != size for s in samples):
            raise ValueError("all samples of a batch must have the same output size")
        lengths = [0 if s.data is None else len(s.data) for s in samples]
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = torch.empty(int(offsets[-1]), dtype=torch.uint8)
        buf = data.numpy()
        for s, start, n in zip(samples, offsets[:-1], lengths):
            if n:
                buf[start : start + n] = np.frombuffer(s.data, dtype=np.uint8)  # type: ignore[arg-type]
        cpu = [i for i, s in enumerate(samples) if s.image is not None]
        cpu_images = (
            torch.from_numpy(np.stack([samples[i].image for i in cpu]))  # type: ignore[misc]
            if cpu
            else torch.empty((0, 3, *size), dtype=torch.uint8)
        )
        return EncodedBatch(
            data=data,
            offsets=torch.from_numpy(offsets),
            boxes=torch.tensor([s.box for s in samples], dtype=torch.int64),
            flips=torch.tensor([s.flip for s in samples], dtype=torch.bool),
            cpu_index=torch.tensor(cpu, dtype=torch.int64),
            cpu_images=cpu_images,
            size=size,
        )

    def pin_memory(self) -> EncodedBatch:
        """Pin the pixel tensor (the only one copied to the device as a whole)."""
        return EncodedBatch(
            self.data,
            self.offsets,
            self.boxes,
            self.flips,
            self.cpu_index,
            self.cpu_images.pin_memory(),
            self.size,
        )

    def jpeg(self, i: int) -> torch.Tensor:
        """The encoded bytes of sample ``i`` (a view into ``data``)."""
        return self.data[int(self.offsets[i]) : int(self.offsets[i + 1])]


class JpegCropSampler:
    """Worker-side transform for GPU decoding: header -> crop box and flip; no pixels touched.

    Draws from ``rng`` in the same order as :class:`RandomResizedCropFlip` (crop box, then flip),
    so the same seed gives the same crops on either path. Non-JPEG or CMYK input falls back to the
    CPU transform and ships the finished crop.
    """

    def __init__(
        self,
        size: int | Sequence[int] = 224,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ) -> None:
        self.cpu = RandomResizedCropFlip(size, scale=scale, ratio=ratio, hflip=hflip)
        self.size, self.scale, self.ratio, self.hflip = (
            self.cpu.size,
            self.cpu.scale,
            self.cpu.ratio,
            self.cpu.hflip,
        )

    def __repr__(self) -> str:
        return (
            f"JpegCropSampler(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip})"
        )

    def __call__(self, data: bytes, rng: np.random.Generator) -> EncodedSample:
        header = None
        if data[:2] == _JPEG_MAGIC:
            try:
                header = simplejpeg.decode_jpeg_header(data)
            except ValueError:
                header = None
        if header is None or header[2] not in _FAST_COLORSPACES:
            image = self.cpu(data, rng)
            return EncodedSample(None, (0, 0, 0, 0), False, self.size, image=image)
        height, width = header[0], header[1]
        box = crop_params(height, width, self.scale, self.ratio, rng)
        flip = self.hflip > 0.0 and rng.random() < self.hflip
        return EncodedSample(bytes(data), box, bool(flip), self.size)


def build_gpu_decode_transform(cfg: dict[str, Any]) -> JpegCropSampler:
    """A :class:`JpegCropSampler` from a single view dict (``size``, ``scale``, ``ratio``, ``hflip``).

    Colour operations need the pixels in the worker, so a view that asks for them is refused.
    """
    _check_keys(
        cfg,
        ("size", "scale", "ratio", "hflip", "dct_margin", "fast_decode"),
        "a GPU-decoded view config (colour operations need the CPU path)",
    )
    return JpegCropSampler(**{k: v for k, v in cfg.items() if k not in ("dct_margin", "fast_decode")})


def resize_crop_float(
    img: torch.Tensor, box: Sequence[int], size: tuple[int, int], flip: bool
) -> torch.Tensor:
    """uint8 [3, H, W] image -> uint8 [3, *size]: crop ``box``, antialiased bicubic, round, flip.

    Float arithmetic (the GPU kernels have no uint8 antialiased path); rounding and clamping to
    0..255 as PIL does after its resampling.
    """
    top, left, h, w = (int(v) for v in box)
    crop = img[:, top : top + h, left : left + w].unsqueeze(0)
    if (h, w) == tuple(size):
        out = crop[0]
    else:
        out = F.interpolate(
            crop.float(), size=tuple(size), mode="bicubic", antialias=True, align_corners=False
        )
        out = out[0].round_().clamp_(0, 255).to(torch.uint8)
    return out.flip(-1) if flip else out


class GpuJpegDecoder:
    """Decode an :class:`EncodedBatch` on ``device``: uint8 [B, 3, H, W] crops, flipped as drawn.

    ``device="cpu"`` runs the same logic with torchvision's CPU decoder (for tests and machines
    without a GPU; slower than the CPU transform, which reads only what it needs).
    """

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)

    def __repr__(self) -> str:
        return f"GpuJpegDecoder(device={self.device})"

    def _decode(self, batch: EncodedBatch, index: list[int]) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they work.
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._decode_jpegs([batch.jpeg(i) for i in index])

    def _decode_jpegs(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass  # one bad file fails the whole batched call: retry one by one
        out = []
        for d in datas:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                with Image.open(io.BytesIO(d.numpy().tobytes())) as src:
                    arr = np.asarray(src.convert("RGB"))
                out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).to(self.device))
        return out

    def __call__(self, batch: EncodedBatch) -> torch.Tensor:
        n = len(batch)
        out = torch.empty((n, 3, *batch.size), dtype=torch.uint8, device=self.device)
        cpu = set(batch.cpu_index.tolist())
        index = [i for i in range(n) if i not in cpu]
        if index:
            boxes, flips = batch.boxes.tolist(), batch.flips.tolist()
            for i, img in zip(index, self._decode(batch, index)):
                out[i] = resize_crop_float(img, boxes[i], batch.size, flips[i])
        if cpu:
            out[batch.cpu_index.to(self.device)] = batch.cpu_images.to(self.device, non_blocking=True)
        return out
