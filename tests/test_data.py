"""Tests for mimscale.data: shard writing, the WebDataset loader, uint8 transforms and the demo set.

Everything runs on CPU against real tar shards in a temporary folder (webdataset is not mocked).
Images are small so the whole file stays well under a minute on two shared cores.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
import torchvision.transforms as T
from PIL import Image

from mimscale.data import shards as shards_mod
from mimscale.data.demo import ensure_demo_shards, synth_image
from mimscale.data.pipeline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    build_train_loader,
    expand_urls,
    normalize_on_device,
)
from mimscale.data.shards import add_make_shards_arguments, brace_spec, run_make_shards
from mimscale.data.transforms import (
    ColorJitter,
    Grayscale,
    RandomResizedCropFlip,
    Solarize,
    View,
    Views,
    build_transform,
    crop_params,
    is_channels_last,
    to_chw,
)

# ----------------------------------------------------------------------------------------------
# helpers


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _make_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mimscale make-shards")
    add_make_shards_arguments(parser)
    return parser.parse_args(list(argv))


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes: 'bird' 3 JPEGs (one nested), 'cat' 2 PNGs + 1 BMP, 'dog' 4 JPEGs -> 10 images."""
    root = tmp_path_factory.mktemp("images")
    k = 0
    layout = {"bird": ["jpg", "jpg", "sub/jpg"], "cat": ["png", "png", "bmp"], "dog": ["jpeg"] * 4}
    for cls, kinds in layout.items():
        for j, kind in enumerate(kinds):
            img = synth_image(k, 40)[0]
            k += 1
            ext = kind.split("/")[-1]
            path = root / cls / (kind.rpartition("/")[0]) / f"img{j}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP"}[ext])
    return root


# ----------------------------------------------------------------------------------------------
# shards


def test_make_shards_labels_counts_and_content(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = _make_args(
        "--input", str(image_folder), "--output", str(out / "train-%06d.tar"), "--samples-per-shard", "4"
    )
    assert run_make_shards(args) == 0

    meta = json.loads((out / "dataset.json").read_text())
    assert meta["classes"] == ["bird", "cat", "dog"]
    assert meta["class_counts"] == [3, 3, 4]
    assert meta["num_samples"] == 10 and meta["num_shards"] == 3
    assert meta["urls"] == "train-{000000..000002}.tar"
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset.json",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]

    members: dict[str, bytes] = {}
    for shard in sorted(out.glob("*.tar")):
        members.update(_tar_members(shard))
    # Sorted relative paths: bird/img0, bird/img1, bird/sub/img2, cat/img0..2 (png, png, bmp), dog/...
    assert members["00000000.jpg"] == (image_folder / "bird/img0.jpg").read_bytes()
    assert members["00000002.jpg"] == (image_folder / "bird/sub/img2.jpg").read_bytes()
    assert members["00000003.png"] == (image_folder / "cat/img0.png").read_bytes()
    assert Image.open(io.BytesIO(members["00000005.jpg"])).format == "JPEG"  # BMP re-encoded
    assert members["00000009.jpg"] == (image_folder / "dog/img3.jpeg").read_bytes()
    labels = [int(members[f"{i:08d}.cls"]) for i in range(10)]
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert set(_tar_members(out / "train-000001.tar")) == {
        "00000004.png", "00000004.cls", "00000005.jpg", "00000005.cls",
        "00000006.jpg", "00000006.cls", "00000007.jpg", "00000007.cls",
    }  # fmt: skip


def test_parallel_tasks_equal_single_run_and_seeded_order(image_folder: Path, tmp_path: Path) -> None:
    single, split = tmp_path / "single", tmp_path / "split"
    common = ["--input", str(image_folder), "--samples-per-shard", "2", "--shuffle-seed", "7"]
    assert run_make_shards(_make_args(*common, "--output", str(single / "s-%04d.tar"))) == 0
    for i in (2, 0, 1):  # any order, as SLURM array tasks run
        args = _make_args(
            *common, "--output", str(split / "s-%04d.tar"), "--shard-index", str(i), "--num-shards", "3"
        )
        assert run_make_shards(args) == 0
    assert len(_digests(single)) == 5
    assert _digests(single) == _digests(split)  # byte-identical shards
    assert (single / "dataset.json").read_text() == (split / "dataset.json").read_text()

    # The seed permutes the order deterministically; without it the order is sorted.
    order = [
        int(_tar_members(p)[n])
        for p in sorted(single.glob("*.tar"))
        for n in sorted(_tar_members(p))
        if n.endswith("cls")
    ]
    assert sorted(order) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2] and order != sorted(order)


def test_task_writes_only_its_shards(image_folder: Path, tmp_path: Path) -> None:
    args = _make_args(
        "--input", str(image_folder), "--output", str(tmp_path / "t-%d.tar"), "--samples-per-shard", "2",
        "--shard-index", "1", "--num-shards", "2",
    )  # fmt: skip
    assert run_make_shards(args) == 0
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["t-1.tar", "t-3.tar"]
    assert not (tmp_path / "dataset.json").exists()  # written by task 0 only


def test_killed_task_leaves_no_partial_shard(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    real_encode = shards_mod._encode
    calls = {"n": 0}

    def dying_encode(path: Path) -> tuple[str, bytes]:
        calls["n"] += 1
        if calls["n"] == 6:  # in the middle of the second shard
            raise KeyboardInterrupt  # what SIGINT/SIGTERM-as-exception looks like mid-write
        return real_encode(path)

    monkeypatch.setattr(shards_mod, "_encode", dying_encode)
    argv = [
        "--input",
        str(image_folder),
        "--output",
        str(tmp_path / "x-%03d.tar"),
        "--samples-per-shard",
        "4",
    ]
    with pytest.raises(KeyboardInterrupt):
        run_make_shards(_make_args(*argv))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000.tar"]  # complete shard only, no temp file
    assert len(_tar_members(tmp_path / "x-000.tar")) == 8

    # A requeued task with --skip-existing keeps the finished shard and writes the rest.
    monkeypatch.setattr(shards_mod, "_encode", real_encode)
    stamp = (tmp_path / "x-000.tar").stat().st_mtime_ns
    assert run_make_shards(_make_args(*argv, "--skip-existing")) == 0
    assert (tmp_path / "x-000.tar").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["x-000.tar", "x-001.tar", "x-002.tar"]


def test_unreadable_image_is_skipped_by_writer(tmp_path: Path, capsys) -> None:
    (tmp_path / "in").mkdir()
    synth_image(0, 16)[0].save(tmp_path / "in" / "a.jpg")
    (tmp_path / "in" / "b.jpg").write_bytes(b"this is not an image")
    args = _make_args("--input", str(tmp_path / "in"), "--output", str(tmp_path / "o" / "s-%d.tar"))
    assert run_make_shards(args) == 0
    assert set(_tar_members(tmp_path / "o" / "s-0.tar")) == {"00000000.jpg"}  # unlabelled: no cls
    assert "skipped 1 unreadable" in capsys.readouterr().out


def test_file_list_mode(image_folder: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\ndog/img1.jpeg 5\n\nbird/img0.jpg 3\ncat/img0.png 0\n")
    out = tmp_path / "out" / "fl-%02d.tar"
    args = _make_args("--input", str(image_folder), "--file-list", str(listing), "--output", str(out))
    assert run_make_shards(args) == 0
    members = _tar_members(out.parent / "fl-00.tar")
    assert members["00000000.jpg"] == (image_folder / "dog/img1.jpeg").read_bytes()  # list order kept
    assert [int(members[f"{i:08d}.cls"]) for i in range(3)] == [5, 3, 0]
    meta = json.loads((out.parent / "dataset.json").read_text())
    assert meta["num_classes"] == 6 and meta["class_counts"] == [1, 0, 0, 1, 0, 1]

    unlabelled = tmp_path / "nolabels.txt"
    unlabelled.write_text(f"{image_folder / 'bird/img0.jpg'}\n")
    out2 = tmp_path / "out2" / "u-%02d.tar"
    assert run_make_shards(_make_args("--file-list", str(unlabelled), "--output", str(out2))) == 0
    assert set(_tar_members(out2.parent / "u-00.tar")) == {"00000000.jpg"}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_dir", "is not a directory"),
        ("empty_dir", "contains no images"),
        ("no_field", "must contain exactly one integer field"),
        ("index_too_big", "--shard-index must be in [0, 1] for --num-shards 2, got 2"),
        ("mixed_labels", "either every line is 'path label'"),
    ],
)
def test_make_shards_bad_input(case: str, message: str, image_folder: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "o-%03d.tar")
    if case == "missing_dir":
        argv = ["--input", str(tmp_path / "nope"), "--output", out]
    elif case == "empty_dir":
        (tmp_path / "empty" / "cls").mkdir(parents=True)
        argv = ["--input", str(tmp_path / "empty"), "--output", out]
    elif case == "no_field":
        argv = ["--input", str(image_folder), "--output", str(tmp_path / "train.tar")]
    elif case == "index_too_big":
        argv = ["--input", str(image_folder), "--output", out, "--shard-index", "2", "--num-shards", "2"]
    else:
        (tmp_path / "l.txt").write_text("bird/img0.jpg 1\nbird/img1.jpg\n")
        argv = ["--input", str(image_folder), "--file-list", str(tmp_path / "l.txt"), "--output", out]
    assert run_make_shards(_make_args(*argv)) == 2
    err = capsys.readouterr().err
    assert message in err
    if case in ("missing_dir", "no_field"):
        assert repr(argv[1] if case == "missing_dir" else argv[3]) in err  # names the offending value


def test_brace_spec() -> None:
    assert brace_spec("d/train-%06d.tar", 3) == "d/train-{000000..000002}.tar"
    assert brace_spec("d/train-%d.tar", 1) == "d/train-0.tar"
    assert expand_urls(brace_spec("d/x-%03d.tar", 12)) == [f"d/x-{i:03d}.tar" for i in range(12)]


# ----------------------------------------------------------------------------------------------
# loader


def test_expand_urls() -> None:
    assert expand_urls("a/{0..2}.tar::b/x-{00..01}.tar") == [
        "a/0.tar",
        "a/1.tar",
        "a/2.tar",
        "b/x-00.tar",
        "b/x-01.tar",
    ]
    assert expand_urls("pipe:cat /data/s-{0..1}.tar") == ["pipe:cat /data/s-0.tar", "pipe:cat /data/s-1.tar"]
    with pytest.raises(ValueError, match="stray"):
        expand_urls("a.tar::")


@pytest.fixture(scope="module")
def demo_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ensure_demo_shards(
        tmp_path_factory.mktemp("demo"), num_images=64, image_size=32, samples_per_shard=16
    )


def test_loader_shapes_dtypes_labels_one_pass(demo_spec: str) -> None:
    loader = build_train_loader(
        demo_spec, build_transform({"size": 24}), 8, seed=0, rank=0, world_size=1, num_workers=0,
        shuffle_buffer=0, resampled=False,
    )  # fmt: skip
    batches = list(loader)
    assert len(batches) == 8
    for b in batches:
        assert isinstance(b, Batch)
        assert b.images.dtype == torch.uint8 and b.images.shape == (8, 3, 24, 24)
        # interleaved pixels, as the resize writes them; normalize_on_device makes them NCHW
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        assert b.labels.dtype == torch.int64 and b.skipped == 0
    labels = torch.cat([b.labels for b in batches])
    assert torch.bincount(labels).tolist() == [16, 16, 16, 16]  # every sample exactly once


def test_loader_workers_ranks_and_seeds(demo_spec: str) -> None:
    tf = build_transform({"size": 16})

    def labels(
        rank: int, world: int, workers: int, resampled: bool, seed: int = 0, n: int = 100
    ) -> list[int]:
        loader = build_train_loader(
            demo_spec, tf, 4, seed=seed, rank=rank, world_size=world, num_workers=workers,
            shuffle_buffer=8, resampled=resampled,
        )  # fmt: skip
        out: list[int] = []
        for b, _ in zip(loader, range(n)):
            out += b.labels.tolist()
        return out

    # Non-resampled: 2 ranks x 2 workers over 4 shards see every sample once in total.
    seen = labels(0, 2, 2, False) + labels(1, 2, 2, False)
    assert sorted(seen) == sorted(list(range(4)) * 16)
    # Resampled: infinite, reproducible for a seed, different per rank and per seed.
    a = labels(0, 2, 0, True, n=20)
    assert len(a) == 80 and a == labels(0, 2, 0, True, n=20)
    assert a != labels(1, 2, 0, True, n=20) and a != labels(0, 2, 0, True, seed=1, n=20)


def test_pin_memory_batch() -> None:
    b = Batch((torch.zeros(2, 3, 4, 4, dtype=torch.uint8),) * 2, torch.zeros(2, dtype=torch.int64), 3)
    if torch.cuda.is_available():
        p = b.pin_memory()
        assert all(t.is_pinned() for t in p.images) and p.skipped == 3
    assert len(b) == 2


def test_corrupt_sample_skipped_counted_and_logged(tmp_path: Path, caplog) -> None:
    good = [_jpeg(synth_image(i, 32)[0]) for i in range(6)]
    members: list[tuple[str, bytes]] = []
    for i, data in enumerate(good):
        members += [(f"{i:03d}.jpg", data), (f"{i:03d}.cls", str(i % 2).encode())]
    members += [("bad1.jpg", good[0][:200]), ("bad1.cls", b"1")]  # truncated JPEG
    members += [("bad2.png", b"\x89PNG\r\n\x1a\n not really"), ("bad2.cls", b"0")]
    members += [("nolabel.jpg", good[1]), ("nolabel.cls", b"not-an-int")]
    members += [("onlycls.cls", b"3")]  # no image member at all
    # Bad samples first: a worker reports its skips with the next batch it yields.
    _write_tar(tmp_path / "t.tar", members[12:] + members[:12])

    caplog.set_level(logging.WARNING, logger="mimscale.data.pipeline")
    loader = build_train_loader(
        str(tmp_path / "t.tar"), build_transform({"size": 16}), 2, seed=0, rank=0, world_size=1,
        num_workers=0, shuffle_buffer=0, resampled=False,
    )  # fmt: skip
    batches = list(loader)
    assert [b.skipped for b in batches] == [4, 0, 0]
    assert [b.labels.tolist() for b in batches] == [[0, 1], [0, 1], [0, 1]]
    assert "bad1" in caplog.text  # rate-limited: the first failure is logged with its key


def test_unreachable_shards_fail_loudly_instead_of_hanging(tmp_path: Path, monkeypatch) -> None:
    from mimscale.data import pipeline

    monkeypatch.setattr(pipeline, "MAX_CONSECUTIVE_FAILURES", 50)
    loader = build_train_loader(
        str(tmp_path / "missing-{0..3}.tar"), build_transform({"size": 16}), 2, seed=0, rank=0,
        world_size=1, num_workers=0,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="consecutive unreadable"):
        next(iter(loader))


def test_pickle_member_is_never_unpickled(tmp_path: Path) -> None:
    class Payload:
        def __init__(self, target: Path) -> None:
            self.target = target

        def __reduce__(self):
            return (os.mkdir, (str(self.target),))

    # Sanity: the payload really executes when unpickled.
    pickle.loads(pickle.dumps(Payload(tmp_path / "proof")))
    assert (tmp_path / "proof").is_dir()

    sentinel = tmp_path / "pwned"
    evil = pickle.dumps(Payload(sentinel))
    members: list[tuple[str, bytes]] = []
    for i in range(4):
        members += [(f"{i:03d}.jpg", _jpeg(synth_image(i, 32)[0])), (f"{i:03d}.cls", b"1")]
        members += [(f"{i:03d}.pyd", evil), (f"{i:03d}.pickle", evil)]
    _write_tar(tmp_path / "evil.tar", members)
    loader = build_train_loader(
        str(tmp_path / "evil.tar"), build_transform({"size": 16}), 2, seed=0, rank=0, world_size=1,
        num_workers=0, shuffle_buffer=0, resampled=False,
    )  # fmt: skip
    batches = list(loader)
    assert sum(len(b) for b in batches) == 4 and all(b.skipped == 0 for b in batches)
    assert not sentinel.exists()


def test_normalize_on_device() -> None:
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ref = (x.float() / 255 - mean) / std
    out = normalize_on_device(x, "cpu")
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
    views = normalize_on_device([x, x[:, :, :3, :3]], "cpu", dtype=torch.bfloat16)
    assert isinstance(views, tuple) and views[1].shape == (2, 3, 3, 3) and views[0].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="uint8"):
        normalize_on_device(x.float(), "cpu")


def test_normalize_on_device_turns_channels_last_batches_into_contiguous_nchw() -> None:
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = normalize_on_device(x_cl, "cpu", dtype=torch.bfloat16)
    assert out.is_contiguous() and torch.equal(out, normalize_on_device(x, "cpu", dtype=torch.bfloat16))


# ----------------------------------------------------------------------------------------------
# transforms


@pytest.mark.parametrize(("height", "width", "scale"), [(375, 500, (0.2, 1.0)), (100, 900, (0.08, 1.0))])
def test_crop_params_match_torchvision_statistics(
    height: int, width: int, scale: tuple[float, float]
) -> None:
    ratio = (3 / 4, 4 / 3)
    n = 4000
    rng = np.random.default_rng(0)
    ours = np.array([crop_params(height, width, scale, ratio, rng) for _ in range(n)], dtype=np.float64)
    torch.manual_seed(0)
    dummy = torch.empty(1, height, width)
    theirs = np.array(
        [T.RandomResizedCrop.get_params(dummy, list(scale), list(ratio)) for _ in range(n)], np.float64
    )

    def stats(boxes: np.ndarray) -> np.ndarray:
        top, left, h, w = boxes.T
        area = h * w / (height * width)
        return np.array([area.mean(), np.log(w / h).mean(), (top / height).mean(), (left / width).mean()])

    np.testing.assert_allclose(stats(ours), stats(theirs), atol=0.02)
    assert (ours[:, 2] <= height).all() and (ours[:, 3] <= width).all() and (ours[:, :2] >= 0).all()


def test_crop_params_fallback_is_torchvision_central_crop() -> None:
    rng = np.random.default_rng(0)
    # No box of >= 90% area with aspect in [3/4, 4/3] fits a 10:1 image: central crop at ratio 4/3.
    assert crop_params(10, 100, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (0, 43, 10, 13)
    assert crop_params(100, 10, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (43, 0, 13, 10)


@pytest.mark.parametrize(
    ("size", "scale", "margin", "tol"),
    [
        (64, (0.2, 1.0), 1.0, 3.0),
        (32, (0.5, 1.0), 1.0, 5.0),
        (32, (0.5, 1.0), 2.0, 1.0),
        (48, (0.05, 0.25), 1.0, 3.0),
    ],
)
def test_dct_scaled_fast_path_close_to_full_decode(
    size: int, scale: tuple[float, float], margin: float, tol: float
) -> None:
    # Sharp-edged synthetic shapes are the worst case for libjpeg's 1/8 scale (block means only).
    img = synth_image(3, 96)[0].resize((400, 300), Image.Resampling.BICUBIC)
    data = _jpeg(img)
    height, width = 300, 400
    transform = RandomResizedCropFlip(size, scale=scale, hflip=0.0, dct_margin=margin)
    for seed in range(6):
        fast = transform(data, np.random.default_rng(seed))
        assert fast.dtype == np.uint8 and fast.shape == (3, size, size) and is_channels_last(fast)
        top, left, h, w = crop_params(
            height, width, transform.scale, transform.ratio, np.random.default_rng(seed)
        )
        min_h, min_w = -(-int(margin * size) * height // h), -(-int(margin * size) * width // w)
        assert (
            simplejpeg.decode_jpeg(data, min_height=min_h, min_width=min_w).shape[0] < height
        )  # really reduced
        full = Image.open(io.BytesIO(data)).convert("RGB")
        ref = to_chw(full.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)))
        assert np.abs(fast.astype(np.int16) - ref.astype(np.int16)).mean() < tol


def test_flip_and_formats() -> None:
    img = synth_image(5, 48)[0]
    no_crop = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0)}
    plain = RandomResizedCropFlip(48, hflip=0.0, **no_crop)(_png(img), np.random.default_rng(0))
    flipped = RandomResizedCropFlip(48, hflip=1.0, **no_crop)(_png(img), np.random.default_rng(0))
    assert np.array_equal(plain, to_chw(img)) and np.array_equal(flipped, plain[:, :, ::-1])
    # Grayscale and CMYK JPEGs, RGBA PNG, WebP: all become 3-channel uint8.
    rgba = img.convert("RGBA")
    cmyk = _jpeg(img.convert("CMYK"))
    for data in (_jpeg(img.convert("L")), cmyk, _png(rgba), _webp(img)):
        out = RandomResizedCropFlip(32)(data, np.random.default_rng(1))
        assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    # Stray bytes before a marker (common in ImageNet): libjpeg-turbo's strict mode refuses, PIL decodes.
    good = _jpeg(img)
    i = good.index(b"\xff\xc4")
    stray = good[:i] + b"\x12\x34" + good[i:]
    with pytest.raises(ValueError):
        simplejpeg.decode_jpeg(stray)
    out = RandomResizedCropFlip(48, hflip=0.0, **no_crop)(stray, np.random.default_rng(0))
    assert np.abs(out.astype(int) - to_chw(img).astype(int)).mean() < 4
    cmyk_out = RandomResizedCropFlip(48, hflip=0.0, **no_crop)(cmyk, np.random.default_rng(0))
    assert np.abs(cmyk_out.astype(int) - to_chw(img).astype(int)).mean() < 8  # colours not inverted


def _webp(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="WEBP")
    return buf.getvalue()


def test_colour_ops_are_uint8_and_correct() -> None:
    img = synth_image(7, 32)[0]
    rng = np.random.default_rng(0)
    arr = np.asarray(img)
    sol = np.asarray(Solarize(128, p=1.0)(img, rng))
    assert np.array_equal(sol, np.where(arr >= 128, 255 - arr, arr))
    gray = np.asarray(Grayscale(p=1.0)(img, rng))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert ColorJitter(p=0.0)(img, rng) is img
    jittered = ColorJitter(p=1.0)(img, rng)
    assert jittered.mode == "RGB" and not np.array_equal(np.asarray(jittered), arr)
    hue_only = np.asarray(ColorJitter(brightness=0, contrast=0, saturation=0, hue=0.5, p=1.0)(img, rng))
    assert hue_only.dtype == np.uint8 and not np.array_equal(hue_only, arr)


def test_build_transform_views_and_multiview_loader(demo_spec: str) -> None:
    lut = build_transform(
        [
            {"size": 32},
            {
                "size": 32,
                "color_jitter": True,
                "one_of": [{"grayscale": 1.0}, {"solarize": 1.0}, {"blur": {"p": 1.0, "sigma": [0.1, 2.0]}}],
            },
        ]
    )
    assert isinstance(lut, Views) and isinstance(lut.views[1], View) and len(lut.views[1].ops) == 2
    ibot = build_transform(
        [{"size": 32, "scale": [0.25, 1.0], "repeat": 2}, {"size": 16, "scale": [0.05, 0.25], "repeat": 3}]
    )
    assert len(ibot) == 5
    loader = build_train_loader(
        demo_spec, ibot, 4, seed=0, rank=0, world_size=1, num_workers=0, shuffle_buffer=0
    )
    batch = next(iter(loader))
    assert isinstance(batch.images, tuple) and len(batch.images) == 5
    assert [tuple(t.shape) for t in batch.images] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(t.dtype == torch.uint8 for t in batch.images)
    out = lut(_jpeg(synth_image(1, 40)[0]), np.random.default_rng(0))
    assert isinstance(out, tuple) and [o.shape for o in out] == [(3, 32, 32)] * 2
    assert isinstance(build_transform({"size": [24, 32]}), RandomResizedCropFlip)


@pytest.mark.parametrize(
    ("cfg", "bad"),
    [
        ({"size": 224, "sclae": [0.2, 1.0]}, "'sclae'"),
        ([{"size": 96, "color_jitter": {"brightnes": 0.4}}], "'brightnes'"),
        ({"one_of": [{"grayscale": 1.0, "solarize": 1.0}]}, "exactly one operation"),
        ({"blur": {"p": 0.5, "radius": 2}}, "'radius'"),
    ],
)
def test_build_transform_rejects_unknown_keys(cfg, bad: str) -> None:
    with pytest.raises(ValueError, match="allowed keys|exactly one") as info:
        build_transform(cfg)
    assert bad in str(info.value)
    if "sclae" in bad:
        assert "scale" in str(info.value) and "color_jitter" in str(info.value)


# ----------------------------------------------------------------------------------------------
# demo


def test_demo_shards_idempotent_and_structured(tmp_path: Path) -> None:
    spec = ensure_demo_shards(tmp_path, num_images=8, image_size=32, samples_per_shard=4)
    urls = expand_urls(spec)
    assert len(urls) == 2 and all(Path(u).is_file() for u in urls)
    stamp = [Path(u).stat().st_mtime_ns for u in urls]
    assert ensure_demo_shards(tmp_path, num_images=8, image_size=32, samples_per_shard=4) == spec
    assert [Path(u).stat().st_mtime_ns for u in urls] == stamp  # not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-8-32px-4"]  # no temp dirs left
    meta = json.loads((Path(urls[0]).parent / "dataset.json").read_text())
    assert meta["num_samples"] == 8 and meta["num_classes"] == 4

    # Deterministic, neither flat nor noise: varied pixels, yet neighbours strongly correlated.
    a, b = np.asarray(synth_image(11, 64)[0], np.float64), np.asarray(synth_image(11, 64)[0], np.float64)
    assert np.array_equal(a, b)
    assert a.std() > 20
    corr = np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1]
    assert corr > 0.7
