"""Correctness of the fast paths: the uint8 crop pipeline against torchvision's, the GPU-decode
logic on CPU, the tar reader, the shared-memory collate, FLOP counting and torch.compile.

No timing assertions here: speed is measured by benchmarks/ (see benchmarks/README.md).
"""

from __future__ import annotations

import copy
import io
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from conftest import tiny, tiny_method_kwargs
from PIL import Image

from mimscale.data.gpu_decode import EncodedBatch, GpuJpegDecoder, JpegCropSampler, build_gpu_decode_transform
from mimscale.data.pipeline import (
    TarFormatError,
    build_train_loader,
    empty_uint8_batch,
    iter_tar_members,
    stack_uint8,
)
from mimscale.data.transforms import (
    RandomResizedCropFlip,
    Views,
    build_transform,
    crop_params,
    is_channels_last,
    to_chw,
)
from mimscale.flops import (
    attention_flops,
    count_flops,
    detect_peak_tflops,
    method_flops,
    vit_encoder_flops,
)
from mimscale.methods.base import create_method

TINY = tiny()
TINY_MAE = tiny_method_kwargs("mae")


# ----------------------------------------------------------------------------------------------
# real-photo test images


def _photo() -> Image.Image:
    """matplotlib's grace_hopper.jpg (a real photograph, 512x600; matplotlib is a runtime dependency)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(path) as img:
        return img.convert("RGB")


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_jpegs() -> list[bytes]:
    """ImageNet-sized JPEGs cut from a real photograph: 500x375, 375x500, 333x500, 640x480."""
    src = _photo()
    out = []
    for (w, h), box in [
        ((500, 375), (0, 100, 512, 484)),
        ((375, 500), (40, 0, 490, 600)),
        ((333, 500), (100, 50, 433, 550)),
        ((640, 480), (0, 0, 512, 384)),
    ]:
        out.append(_jpeg(src.resize((w, h), Image.Resampling.LANCZOS, box=box)))
    return out


# ----------------------------------------------------------------------------------------------
# augmentation distribution: fast path vs torchvision's RandomResizedCrop


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.05, 0.25)])
def test_sampled_boxes_match_torchvision_get_params(
    photo_jpegs: list[bytes], scale: tuple[float, float]
) -> None:
    """The boxes the worker-side samplers draw (header only) against ``RandomResizedCrop.get_params``
    on the same image size: means and quantiles of area, log aspect and position, and the flip rate."""
    data = photo_jpegs[0]  # 500x375
    sampler = JpegCropSampler(224, scale=scale)
    rng = np.random.default_rng(0)
    n = 3000
    draws = [sampler(data, rng) for _ in range(n)]
    ours = np.array([d.box for d in draws], dtype=np.float64)
    flips = np.mean([d.flip for d in draws])
    torch.manual_seed(0)
    dummy = torch.empty(1, 375, 500)
    theirs = np.array(
        [T.RandomResizedCrop.get_params(dummy, list(scale), [3 / 4, 4 / 3]) for _ in range(n)], np.float64
    )

    def features(b: np.ndarray) -> np.ndarray:
        top, left, h, w = b.T
        return np.stack([h * w / (375 * 500), np.log(w / h), (top + h / 2) / 375, (left + w / 2) / 500], 1)

    fo, ft = features(ours), features(theirs)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        np.testing.assert_allclose(np.quantile(fo, q, axis=0), np.quantile(ft, q, axis=0), atol=0.03)
    np.testing.assert_allclose(fo.mean(0), ft.mean(0), atol=0.015)
    assert abs(flips - 0.5) < 0.03
    # the CPU path draws the very same boxes and flips from the same stream
    cpu = RandomResizedCropFlip(224, scale=scale)
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(20):
        s = sampler(data, r1)
        top, left, h, w = crop_params(375, 500, cpu.scale, cpu.ratio, r2)
        assert s.box == (top, left, h, w) and s.flip == (r2.random() < 0.5)


def _tv_uint8(img: Image.Image, scale: tuple[float, float]) -> T.Compose:
    return T.Compose(
        [
            T.RandomResizedCrop(224, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
        ]
    )


def test_output_statistics_match_torchvision_path(photo_jpegs: list[bytes]) -> None:
    """Many augmented draws of the same photographs through both paths: per-channel mean and spread,
    and sharpness (mean |horizontal gradient|, sensitive to the resampling filter), agree."""
    tv = _tv_uint8(None, (0.2, 1.0))  # type: ignore[arg-type]
    ours = RandomResizedCropFlip(224, scale=(0.2, 1.0))
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    a_list, b_list = [], []
    for data in photo_jpegs:
        pil = Image.open(io.BytesIO(data)).convert("RGB")
        for _ in range(60):
            a_list.append(ours(data, rng).astype(np.float64))
            b_list.append(tv(pil).numpy().astype(np.float64))
    a, b = np.stack(a_list), np.stack(b_list)
    assert a.shape == b.shape == (240, 3, 224, 224)
    np.testing.assert_allclose(a.mean((0, 2, 3)), b.mean((0, 2, 3)), atol=3.0)
    np.testing.assert_allclose(a.std((0, 2, 3)), b.std((0, 2, 3)), rtol=0.05)

    def sharpness(x: np.ndarray) -> float:
        return float(np.abs(np.diff(x, axis=-1)).mean())

    assert sharpness(a) == pytest.approx(sharpness(b), rel=0.06)


@pytest.mark.parametrize(
    "box", [(20, 30, 300, 320), (0, 0, 375, 500), (100, 200, 150, 120), (50, 60, 224, 224)]
)
def test_fast_resize_equals_pil_bicubic_on_the_same_box(photo_jpegs: list[bytes], box: tuple) -> None:
    """Same decode, same integer box: PyTorch's uint8 antialiased bicubic vs PIL's BICUBIC (what
    torchvision's PIL path calls). Down-, up- and no scaling."""
    from mimscale.data.transforms import resize_crop_uint8

    data = photo_jpegs[0]
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    arr = np.asarray(pil).copy()
    top, left, h, w = box
    ref = to_chw(pil.resize((224, 224), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)))
    out = resize_crop_uint8(arr, box, (224, 224)).numpy()
    assert out.dtype == np.uint8 and out.shape == (3, 224, 224) and is_channels_last(out)
    diff = np.abs(out.astype(np.int16) - ref.astype(np.int16))
    assert diff.mean() < 0.6, diff.mean()
    assert np.percentile(diff, 99) <= 4


def test_large_image_uses_reduced_decode_and_stays_close(photo_jpegs: list[bytes]) -> None:
    """A 1600x1200 photo: large crops decode at a power-of-two DCT scale (1/2 .. 1/8), never at the
    slow 5/8..7/8 scales, and match a full decode + PIL resize closely."""
    from mimscale.data import transforms as tr

    big = _jpeg(_photo().resize((1600, 1200), Image.Resampling.BICUBIC))
    full = Image.open(io.BytesIO(big)).convert("RGB")
    t = RandomResizedCropFlip(224, scale=(0.5, 1.0), hflip=0.0)
    shapes = []
    orig = tr.simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        shapes.append(out.shape[:2])
        return out

    tr.simplejpeg.decode_jpeg = spy
    try:
        for seed in range(5):
            out = t(big, np.random.default_rng(seed))
            top, left, h, w = crop_params(1200, 1600, t.scale, t.ratio, np.random.default_rng(seed))
            ref = to_chw(
                full.resize((224, 224), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
            )
            assert np.abs(out.astype(np.int16) - ref.astype(np.int16)).mean() < 2.5
    finally:
        tr.simplejpeg.decode_jpeg = orig
    assert shapes and all((1200 // s[0]) in (2, 4, 8) for s in shapes)


def test_views_decode_once_and_equal_separate_views(photo_jpegs: list[bytes]) -> None:
    """iBOT-style views share one decode; outputs equal the views run one by one on the same stream,
    and views that could use a reduced decode on their own stay close when they share a larger one."""
    from mimscale.data import transforms as tr

    # Crops too small for a reduced DCT decode (< 2x the output), so the views alone decode at full size too.
    cfg = [{"size": 224, "scale": [0.25, 1.0], "repeat": 2}, {"size": 96, "scale": [0.02, 0.05], "repeat": 4}]
    views = build_transform(cfg)
    assert isinstance(views, Views)
    calls = []
    orig = tr.simplejpeg.decode_jpeg
    tr.simplejpeg.decode_jpeg = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        shared = views(photo_jpegs[1], np.random.default_rng(3))
    finally:
        tr.simplejpeg.decode_jpeg = orig
    assert len(calls) == 1
    rng = np.random.default_rng(3)
    separate = [v(photo_jpegs[1], rng) for v in views.views]
    assert all(np.array_equal(a, b) for a, b in zip(shared, separate))
    small = build_transform(
        [{"size": 224, "scale": [0.25, 1.0]}, {"size": 48, "scale": [0.2, 0.5], "repeat": 3}]
    )
    shared = small(photo_jpegs[3], np.random.default_rng(4))
    rng = np.random.default_rng(4)
    separate = [v(photo_jpegs[3], rng) for v in small.views]
    for a, b in zip(shared, separate):
        assert np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() < 3.0


# ----------------------------------------------------------------------------------------------
# GPU decode logic, exercised with torchvision's CPU decoder


def test_gpu_decoder_logic_on_cpu_matches_cpu_transform(photo_jpegs: list[bytes]) -> None:
    sampler = JpegCropSampler(96, scale=(0.2, 1.0))
    cpu = RandomResizedCropFlip(96, scale=(0.2, 1.0))
    png = io.BytesIO()
    _photo().resize((200, 150)).save(png, format="PNG")
    datas = photo_jpegs + [png.getvalue()]
    samples = [sampler(d, np.random.default_rng(i)) for i, d in enumerate(datas)]
    assert samples[-1].data is None and samples[-1].image is not None  # PNG: cropped in the worker
    batch = EncodedBatch.collate(samples)
    assert batch.cpu_index.tolist() == [len(datas) - 1] and len(batch) == len(datas)
    assert int(batch.offsets[-1]) == sum(len(d) for d in photo_jpegs)
    out = GpuJpegDecoder("cpu")(batch)
    assert out.dtype == torch.uint8 and out.shape == (len(datas), 3, 96, 96)
    ref = np.stack([cpu(d, np.random.default_rng(i)) for i, d in enumerate(datas)])
    diff = np.abs(out.numpy().astype(np.int16) - ref.astype(np.int16))
    assert np.array_equal(out[-1].numpy(), ref[-1])
    assert diff.mean() < 1.0, diff.mean()
    # the flip really happens on the device side: undo it and compare with an unflipped crop
    flipped = [i for i, s in enumerate(samples[:-1]) if s.flip]
    assert flipped, "seeds should give at least one flip"
    i = flipped[0]
    noflip = EncodedBatch.collate([samples[i].__class__(samples[i].data, samples[i].box, False, (96, 96))])
    assert torch.equal(GpuJpegDecoder("cpu")(noflip)[0].flip(-1), out[i])


def test_gpu_decode_sampler_in_the_loader(tmp_path: Path, photo_jpegs: list[bytes]) -> None:
    _write_shard(tmp_path / "s.tar", photo_jpegs * 2)
    loader = build_train_loader(
        str(tmp_path / "s.tar"),
        build_gpu_decode_transform({"size": 64}),
        4,
        seed=0,
        rank=0,
        world_size=1,
        num_workers=0,
        shuffle_buffer=0,
        resampled=False,
    )
    batches = list(loader)
    assert len(batches) == 2 and all(isinstance(b.images, EncodedBatch) for b in batches)
    imgs = GpuJpegDecoder("cpu")(batches[0].images)
    assert imgs.shape == (4, 3, 64, 64)
    if torch.cuda.is_available():
        assert batches[0].pin_memory().images.cpu_images.is_pinned()
    with pytest.raises(ValueError, match="colour operations"):
        build_gpu_decode_transform({"size": 64, "color_jitter": True})


# ----------------------------------------------------------------------------------------------
# tar reading and collate


def _write_shard(path: Path, jpegs: list[bytes], fmt: int = tarfile.PAX_FORMAT, prefix: str = "") -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, data in enumerate(jpegs):
            for ext, payload in (("jpg", data), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"{prefix}{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path: Path, fmt: int) -> None:
    """Long names (pax 'path' records, GNU 'L' entries, ustar prefix), directories and odd sizes."""
    long_dir = "d" * 60 + "/" + "e" * 50 + "/"  # > 100 chars: needs a long-name mechanism
    members = [
        (f"{long_dir}{i:03d}.{ext}", bytes(range(256)) * (i + 1) + b"x" * i)
        for i in range(5)
        for ext in ("jpg", "cls", "json")
    ]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        directory = tarfile.TarInfo("somedir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        got = list(iter_tar_members(f, lambda n: not n.endswith(".json")))
    assert got == [(n, d) for n, d in members if not n.endswith(".json")]
    raw = bytearray(path.read_bytes())
    raw[700] ^= 0xFF  # inside the first member's header or data
    with pytest.raises(TarFormatError):
        list(iter_tar_members(io.BytesIO(bytes(raw[: 1024 + 100])), lambda n: True))


def test_worker_collate_in_shared_memory_equals_in_process(tmp_path: Path, photo_jpegs: list[bytes]) -> None:
    """One DataLoader worker (batch built straight in shared memory) gives the same batches as the
    main process: worker 0 of 1 draws from the same seeds."""
    _write_shard(tmp_path / "s.tar", photo_jpegs * 2)
    kwargs = dict(seed=3, rank=0, world_size=1, shuffle_buffer=4, resampled=True)
    tf = build_transform({"size": 32})
    a = [
        b
        for b, _ in zip(build_train_loader(str(tmp_path / "s.tar"), tf, 4, num_workers=0, **kwargs), range(3))
    ]
    b = [
        b
        for b, _ in zip(build_train_loader(str(tmp_path / "s.tar"), tf, 4, num_workers=1, **kwargs), range(3))
    ]
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        assert y.images.is_contiguous(memory_format=torch.channels_last) and y.images.dtype == torch.uint8
    arrays = [np.full((3, 2, 2), i, np.uint8) for i in range(3)]
    assert torch.equal(stack_uint8(arrays), torch.from_numpy(np.stack(arrays)))


def test_stack_keeps_interleaved_arrays_channels_last_and_planar_arrays_contiguous() -> None:
    rng = np.random.default_rng(0)
    hwc = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(4)]
    interleaved = [a.transpose(2, 0, 1) for a in hwc]  # [3, 5, 7] views, as the transforms return
    planar = [np.ascontiguousarray(a) for a in interleaved]
    expected = torch.from_numpy(np.stack(planar))
    cl = stack_uint8(interleaved)
    assert cl.shape == (4, 3, 5, 7) and cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, expected)
    flat = stack_uint8(planar)
    assert flat.is_contiguous() and torch.equal(flat, expected)


def test_crop_flip_returns_interleaved_chw_equal_to_planar_reference(photo_jpegs: list[bytes]) -> None:
    """The transform's [3, H, W] output has channels-last strides (no planar repacking in the worker)
    and the same values on both the libjpeg-turbo and the PIL path."""
    tf = RandomResizedCropFlip(40, scale=(0.3, 1.0))
    png = io.BytesIO()
    Image.open(io.BytesIO(photo_jpegs[0])).save(png, format="PNG")
    for data in (*photo_jpegs[:3], png.getvalue()):
        for seed in range(4):
            out = tf(data, np.random.default_rng(seed))
            assert out.shape == (3, 40, 40) and out.dtype == np.uint8 and is_channels_last(out)
            ref = np.asarray(tf.crop_image(data, np.random.default_rng(seed))).transpose(2, 0, 1)
            assert np.array_equal(out, ref)


def test_write_into_a_batch_slot_equals_call_on_every_path(photo_jpegs: list[bytes]) -> None:
    """``write`` (what the loader uses for single-crop transforms) fills a channels-last batch slot with
    exactly what ``__call__`` returns from the same draws: crop-region decode, reduced DCT decode
    (large photo), crop already at the output size, PIL fallback (PNG), flipped or not."""
    big = _jpeg(_photo().resize((1600, 1200), Image.Resampling.BICUBIC))
    png = io.BytesIO()
    Image.open(io.BytesIO(photo_jpegs[0])).save(png, format="PNG")
    tiny = _jpeg(_photo().resize((40, 40), Image.Resampling.BICUBIC))
    cases = [
        (RandomResizedCropFlip(56, scale=(0.2, 1.0)), [*photo_jpegs, png.getvalue()]),
        (RandomResizedCropFlip(224, scale=(0.5, 1.0)), [big]),
        (RandomResizedCropFlip(40, scale=(1.0, 1.0), ratio=(1.0, 1.0)), [tiny]),
    ]
    for tf, datas in cases:
        batch = empty_uint8_batch((2, *tf.output_shape), channels_last=True)
        for data in datas:
            for seed in range(6):
                tf.write(data, np.random.default_rng(seed), batch[1])
                assert np.array_equal(batch[1].numpy(), tf(data, np.random.default_rng(seed)))
    with pytest.raises(ValueError, match=r"shape \(3, 56, 56\)"):
        cases[0][0].write(photo_jpegs[0], np.random.default_rng(0), torch.empty(3, 32, 32, dtype=torch.uint8))


class _NoWrite:
    """The same transform seen as a plain callable: the loader stacks its returned arrays instead."""

    def __init__(self, tf: RandomResizedCropFlip) -> None:
        self.tf = tf

    def __call__(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
        return self.tf(data, rng)


@pytest.mark.parametrize("drop_last", [True, False])
def test_loader_writing_into_batches_equals_stacking_returned_arrays(
    tmp_path: Path, photo_jpegs: list[bytes], drop_last: bool
) -> None:
    """Batches filled slot by slot (``write``) equal stacked ``__call__`` outputs, with a corrupt sample
    skipped and counted on both paths and the short last batch kept when ``drop_last`` is off."""
    jpegs = [*photo_jpegs, b"\xff\xd8 not a jpeg", *photo_jpegs, photo_jpegs[0]]  # 10 samples, 1 bad
    _write_shard(tmp_path / "s.tar", jpegs)
    tf = RandomResizedCropFlip(48, scale=(0.3, 1.0))
    kwargs = dict(seed=5, rank=0, world_size=1, num_workers=0, shuffle_buffer=0, resampled=False)
    a = list(build_train_loader(str(tmp_path / "s.tar"), tf, 4, drop_last=drop_last, **kwargs))
    b = list(build_train_loader(str(tmp_path / "s.tar"), _NoWrite(tf), 4, drop_last=drop_last, **kwargs))
    assert [len(x) for x in a] == [len(y) for y in b] == ([4, 4] if drop_last else [4, 4, 1])
    assert sum(x.skipped for x in a) == sum(y.skipped for y in b) == 1
    for x, y in zip(a, b):
        assert x.images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)


# ----------------------------------------------------------------------------------------------
# FLOPs


def test_flops_analytic_equals_counted_with_fused_attention() -> None:
    torch.manual_seed(0)
    mae = create_method("mae", **TINY_MAE)
    x = torch.randn(2, 3, 32, 32)
    mask = mae.masker(2, generator=torch.Generator().manual_seed(0))
    report = method_flops(mae)
    counted, _ = count_flops(mae, x, mask)
    assert counted / 2 == report.forward
    kept = int(64 * 0.25)
    assert report.parts["encoder"] == vit_encoder_flops(1 + kept, 64, 2, 4.0)

    def train_step() -> None:
        mae(x, mask).loss.backward()

    counted_train, _ = count_flops(train_step)
    # 3x forward, less the input gradient of the patch projection (images need none).
    assert counted_train / 2 == pytest.approx(report.train, rel=0.01)

    q = torch.randn(1, 4, 17, 16)
    sdpa, _ = count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q)
    assert sdpa == attention_flops(17, 64)  # the CPU kernel is counted (PyTorch alone counts 0)


def test_full_token_encoder_flops_and_fused_attention_on() -> None:
    from mimscale.models.encoder import MaskedEncoder

    enc = MaskedEncoder("vit_base_patch16_224", **TINY)
    attns = [m for m in enc.modules() if hasattr(m, "fused_attn")]
    assert attns and all(m.fused_attn for m in attns)  # timm uses F.scaled_dot_product_attention
    x = torch.randn(1, 3, 32, 32)
    counted, _ = count_flops(enc, x)
    assert counted == 2 * 64 * 48 * 64 + vit_encoder_flops(65, 64, 2, 4.0)
    mae = create_method("mae", **TINY_MAE)
    assert all(m.fused_attn for m in mae.modules() if hasattr(m, "fused_attn"))


def test_peak_table() -> None:
    assert detect_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert detect_peak_tflops("NVIDIA H200") == 989.0
    assert detect_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert detect_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert detect_peak_tflops("Some CPU") is None


# ----------------------------------------------------------------------------------------------
# torch.compile


def test_compiled_mae_matches_eager_loss_and_grads() -> None:
    """The opt-in ``TrainConfig.compile`` path: inductor-compiled MAE (CPU) gives the eager loss and
    gradients for the same mask."""
    torch.manual_seed(0)
    eager = create_method("mae", **TINY_MAE)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module)
    x = torch.randn(4, 3, 32, 32)
    mask = eager.masker(4, generator=torch.Generator().manual_seed(1))
    out_e = eager(x, mask)
    out_c = compiled(x, mask)
    out_e.loss.backward()
    out_c.loss.backward()
    assert math.isfinite(out_c.loss.item())
    torch.testing.assert_close(out_c.loss, out_e.loss, rtol=1e-5, atol=1e-6)
    grads_e = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    grads_c = {n: p.grad for n, p in compiled_module.named_parameters() if p.grad is not None}
    assert grads_e.keys() == grads_c.keys() and len(grads_e) > 10
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.distributed
def test_loop_decodes_on_the_device_when_asked(tmp_path: Path) -> None:
    """``data.decode=device``: the workers ship JPEG bytes and crop boxes, the training device decodes
    (here the CPU stands in for the GPU), and a 2-rank run trains on the result."""
    pytest.importorskip("deepspeed")
    import json

    from distributed_launch import REPO, run_deepspeed

    run_dir = tmp_path / "run"
    args = ["--smoke", "--ds_config", "zero1.json", "--output_dir", str(run_dir), "--max_steps", "3",
            "--set", "data.decode=device", "--set", "log_interval=1"]
    proc = run_deepspeed(REPO / "recipes" / "mae_vitb.py", args, timeout=900)
    assert "JPEG decode on cpu" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_device_decode_config_is_validated() -> None:
    """Only the two decode places exist, and decoding on the device takes exactly one view."""
    from mimscale.train.config import ConfigError, TrainConfig, validate

    cfg = TrainConfig()
    cfg.data.decode = "device"
    validate(cfg)  # MAE's single default view
    cfg.data.views = [{"size": 224}, {"size": 96}]
    with pytest.raises(ConfigError, match=r"'device' with 2 data.views.*allowed: data.decode='workers'"):
        validate(cfg)


def test_cpu_rank_setup_shares_cores_and_retains_freed_memory() -> None:
    """A CPU rank takes its share of the cores (unless OMP_NUM_THREADS is set) and glibc keeps freed
    large blocks (DeepSpeed's per-step buckets) instead of unmapping them; opt-out by environment."""
    code = (
        "import torch; from mimscale.train.cpu_ranks import configure_cpu_rank as c; print(c()); "
        "a = torch.empty(64 << 20, dtype=torch.uint8); a.fill_(1); del a; print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cores = os.cpu_count() or 1
    out = subprocess.run([sys.executable, "-c", code], env={**env, "LOCAL_WORLD_SIZE": "2"},
                         capture_output=True, text=True, check=True).stdout
    assert f"CPU rank: {max(1, cores // 2)} threads, malloc retains freed blocks, denormals" in out
    assert "ok" in out
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MIMSCALE_CPU_MALLOC": "default",
                                                           "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True).stdout
    assert "CPU rank: 1 threads, malloc default, denormals" in out
