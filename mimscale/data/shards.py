"""Write WebDataset tar shards from an image folder or a file list (``mimscale make-shards``).

Why shards: a parallel file system serves a few large sequential reads far better than millions
of small random ones, and tar shards let every rank stream its own data without a global index.

Layout of the output, for ``--output out/train-%06d.tar``::

    out/train-000000.tar    samples 0 .. N-1 (N = --samples-per-shard), each sample being
        00000000.jpg        the image's original bytes under its format's key (jpg, png, webp;
        00000000.cls        other PIL-readable formats re-encoded to jpg), cls = ascii int label
    out/train-000001.tar    ...
    out/dataset.json        classes, counts, number of shards and the brace URL spec

Order is deterministic: sorted relative paths (or the file list's order), optionally permuted by
``--shuffle-seed``. Sample ``i`` goes to shard ``i // N`` under key ``%08d % i``. With
``--shard-index i --num-shards n`` a task writes only shards ``j`` with ``j % n == i``, so a SLURM
array of ``n`` tasks writes disjoint shards in parallel and the union is byte-identical to a
single run. Every shard is written under a temporary name in the same directory and renamed when
complete, so a killed task never leaves a truncated shard under a final name.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "ImageRecord",
    "add_make_shards_arguments",
    "brace_spec",
    "list_image_folder",
    "read_file_list",
    "run_make_shards",
    "write_shards",
]

log = logging.getLogger(__name__)

# Suffixes we consider images when scanning a folder; anything else PIL reads is re-encoded.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)
# PIL format name -> tar member key for formats stored as-is.
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_PATTERN_RE = re.compile(r"%(0?\d*)d")
# Fixed tar header fields: shards depend only on their content, so parallel and single runs match.
_MTIME = 0


@dataclass(frozen=True)
class ImageRecord:
    """One input image: where it lives and its integer label (-1 = unlabelled)."""

    path: Path
    label: int = -1


def _check_pattern(pattern: str) -> None:
    found = _PATTERN_RE.findall(pattern.replace("%%", ""))
    if len(found) != 1:
        raise ValueError(
            f"--output pattern {pattern!r} must contain exactly one integer field such as %06d "
            "(e.g. out/train-%06d.tar)"
        )
    try:
        first, second = pattern % 0, pattern % 1
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--output pattern {pattern!r} is not a valid %-format: {exc}") from None
    if first == second:
        raise ValueError(f"--output pattern {pattern!r} gives the same name for every shard")


def _check_options(pattern: str, samples_per_shard: int, shard_index: int, num_shards: int) -> None:
    _check_pattern(pattern)
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if num_shards < 1:
        raise ValueError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            f"--shard-index must be in [0, {num_shards - 1}] for --num-shards {num_shards}, got {shard_index}"
        )


def brace_spec(pattern: str, num_shards: int) -> str:
    """``out/train-%06d.tar`` with 3 shards -> ``out/train-{000000..000002}.tar`` (WebDataset URL spec)."""
    _check_pattern(pattern)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards == 1:
        return pattern % 0
    match = _PATTERN_RE.search(pattern)
    assert match is not None
    field = match.group(0)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    # Any other %% escapes around the field must be unescaped the way % formatting would.
    head, tail = head.replace("%%", "%"), tail.replace("%%", "%")
    return f"{head}{{{field % 0}..{field % (num_shards - 1)}}}{tail}"


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_image_folder(root: str | Path) -> tuple[list[ImageRecord], list[str]]:
    """Scan ``root`` for images; returns (records sorted by relative path, class names).

    Immediate subfolders of ``root`` are classes (sorted names -> labels 0..C-1, images found
    recursively below each; an empty folder still takes its label so labels never shift). Images
    placed directly in ``root`` with no class subfolders are unlabelled.
    Mixing both is refused, because silently dropping either group would change the data set.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(
            f"--input {str(root)!r} is not a directory; give a folder of images or class subfolders"
        )
    top = sorted(p for p in root.iterdir() if p.is_file() and _is_image(p))
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [
        (d.name, sorted(p for p in d.rglob("*") if p.is_file() and _is_image(p))) for d in class_dirs
    ]
    if top and any(files for _, files in per_class):
        raise ValueError(
            f"--input {str(root)!r} has images both directly inside it ({top[0].name}, ...) and in class "
            f"subfolders ({next(n for n, f in per_class if f)}/, ...); use one layout or a --file-list"
        )
    if top:
        return [ImageRecord(p) for p in top], []
    for name, files in per_class:
        if not files:
            log.warning("class folder %s/ has no images; it keeps its label with a count of 0", name)
    classes = [name for name, _ in per_class]
    records = [ImageRecord(p, label) for label, (_, files) in enumerate(per_class) for p in files]
    if not records:
        raise ValueError(
            f"--input {str(root)!r} contains no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    # Sorted by relative path: class folders are already sorted, files within them too.
    return records, classes


def read_file_list(list_path: str | Path, base: str | Path | None = None) -> list[ImageRecord]:
    """Parse a file list: one ``path [label]`` per line, ``#`` comments and blank lines ignored.

    Relative paths are resolved against ``base`` (``--input``) or else the current directory.
    Either every line has an integer label or none does; order is kept as written.
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise ValueError(f"--file-list {str(list_path)!r} does not exist or is not a file")
    base_dir = Path(base) if base is not None else Path.cwd()
    records: list[ImageRecord] = []
    labelled: bool | None = None
    for lineno, raw in enumerate(list_path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        label = -1
        if len(parts) == 2 and re.fullmatch(r"-?\d+", parts[1]):
            path_str, label = parts[0], int(parts[1])
            if label < 0:
                raise ValueError(
                    f"--file-list {str(list_path)!r} line {lineno}: label must be >= 0, got {label}"
                )
        else:
            path_str = line
        has_label = label >= 0
        if labelled is None:
            labelled = has_label
        elif labelled != has_label:
            raise ValueError(
                f"--file-list {str(list_path)!r} line {lineno}: {'missing' if labelled else 'unexpected'} "
                "label; either every line is 'path label' or every line is 'path'"
            )
        path = Path(path_str)
        records.append(ImageRecord(path if path.is_absolute() else base_dir / path, label))
    if not records:
        raise ValueError(f"--file-list {str(list_path)!r} lists no images")
    return records


def _encode(path: Path) -> tuple[str, bytes]:
    """Return (member extension, bytes): the original bytes for jpg/png/webp, else a JPEG re-encode."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        key = _KEEP_FORMATS.get(img.format or "")
        if key is not None:
            return key, data
        img = img.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
    return "jpg", buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _MTIME
    info.mode = 0o444
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_one_shard(path: Path, items: Sequence[tuple[int, ImageRecord]]) -> tuple[int, int]:
    """Write one shard atomically; returns (samples written, unreadable images skipped)."""
    written = skipped = 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar,
        ):
            for index, record in items:
                try:
                    ext, data = _encode(record.path)
                except Exception as exc:  # PIL raises OSError, SyntaxError, DecompressionBombError...
                    log.warning("skipping unreadable image %s: %s: %s", record.path, type(exc).__name__, exc)
                    skipped += 1
                    continue
                key = f"{index:08d}"
                _add_member(tar, f"{key}.{ext}", data)
                if record.label >= 0:
                    _add_member(tar, f"{key}.cls", str(record.label).encode("ascii"))
                written += 1
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return written, skipped


def _shard_items(
    records: Sequence[ImageRecord], samples_per_shard: int, shuffle_seed: int | None
) -> Iterator[tuple[int, list[tuple[int, ImageRecord]]]]:
    order = np.arange(len(records))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(records))
    for shard in range(-(-len(records) // samples_per_shard)):
        lo = shard * samples_per_shard
        idx = order[lo : lo + samples_per_shard]
        yield shard, [(lo + k, records[int(i)]) for k, i in enumerate(idx)]


def _write_json_atomic(path: Path, payload: dict) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_shards(
    records: Sequence[ImageRecord],
    pattern: str,
    *,
    classes: Sequence[str] = (),
    samples_per_shard: int = 1000,
    shard_index: int = 0,
    num_shards: int = 1,
    shuffle_seed: int | None = None,
    skip_existing: bool = False,
) -> dict:
    """Write this task's shards for ``records`` and (task 0) ``dataset.json``; returns the summary.

    The summary (also the JSON content) depends only on the inputs, never on which task wrote it,
    so every task may write it and the result is the same.
    """
    _check_options(pattern, samples_per_shard, shard_index, num_shards)
    if not records:
        raise ValueError("no images to write")
    total_shards = -(-len(records) // samples_per_shard)
    out_dir = Path(pattern % 0).parent
    out_dir.mkdir(parents=True, exist_ok=True)

    written = skipped = shards_done = 0
    for shard, items in _shard_items(records, samples_per_shard, shuffle_seed):
        if shard % num_shards != shard_index:
            continue
        path = Path(pattern % shard)
        if skip_existing and path.exists():
            continue
        n, bad = _write_one_shard(path, items)
        written, skipped, shards_done = written + n, skipped + bad, shards_done + 1
        log.info("wrote %s (%d samples)", path, n)
    if skipped:
        log.warning("skipped %d unreadable images in this task", skipped)

    labels = Counter(r.label for r in records if r.label >= 0)
    num_classes = len(classes) if classes else (max(labels) + 1 if labels else 0)
    summary = {
        "format": "mimscale-webdataset-v1",
        "num_samples": len(records),
        "num_shards": total_shards,
        "samples_per_shard": samples_per_shard,
        "shuffle_seed": shuffle_seed,
        "pattern": Path(pattern).name,
        "urls": Path(brace_spec(pattern, total_shards)).name,
        "classes": list(classes),
        "num_classes": num_classes,
        "class_counts": [labels.get(c, 0) for c in range(num_classes)],
    }
    if shard_index == 0:
        _write_json_atomic(out_dir / "dataset.json", summary)
    return {**summary, "written_samples": written, "written_shards": shards_done, "skipped_images": skipped}


def add_make_shards_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``mimscale make-shards`` options on ``parser``."""
    parser.add_argument(
        "--input", help="image folder (class subfolders give labels); base for relative --file-list paths"
    )
    parser.add_argument(
        "--output", required=True, help="shard path pattern with one integer field, e.g. out/train-%%06d.tar"
    )
    parser.add_argument(
        "--file-list", help="text file with one 'path [label]' per line instead of scanning --input"
    )
    parser.add_argument(
        "--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)"
    )
    parser.add_argument(
        "--shard-index", type=int, default=None, help="this task's index; default $SLURM_ARRAY_TASK_ID or 0"
    )
    parser.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="number of parallel tasks; default $SLURM_ARRAY_TASK_COUNT or 1",
    )
    parser.add_argument(
        "--shuffle-seed", type=int, default=None, help="write samples in a seeded random order"
    )
    parser.add_argument(
        "--skip-existing", action="store_true", help="keep shards that already exist (resume a killed job)"
    )


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def run_make_shards(args: argparse.Namespace) -> int:
    """Entry point for ``mimscale make-shards``: 0 on success, 2 (message on stderr) on bad input.

    Without ``--shard-index``/``--num-shards`` a SLURM array task takes its position in the array
    (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``), so the same
    command line works for one process and for ``sbatch --array=0-N``.
    """
    try:
        return _run(args)
    except ValueError as exc:
        print(f"mimscale make-shards: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.shard_index is not None:
        shard_index = args.shard_index
    else:
        shard_index = _env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0)
    num_shards = args.num_shards if args.num_shards is not None else _env_int("SLURM_ARRAY_TASK_COUNT", 1)
    _check_options(args.output, args.samples_per_shard, shard_index, num_shards)
    if args.file_list:
        records, classes = read_file_list(args.file_list, args.input), []
    elif args.input:
        records, classes = list_image_folder(args.input)
    else:
        raise ValueError("give --input DIR (an image folder) or --file-list FILE")
    summary = write_shards(
        records,
        args.output,
        classes=classes,
        samples_per_shard=args.samples_per_shard,
        shard_index=shard_index,
        num_shards=num_shards,
        shuffle_seed=args.shuffle_seed,
        skip_existing=getattr(args, "skip_existing", False),
    )
    print(
        f"task {shard_index}/{num_shards}: wrote {summary['written_samples']} samples in "
        f"{summary['written_shards']} of {summary['num_shards']} shards"
        + (f", skipped {summary['skipped_images']} unreadable images" if summary["skipped_images"] else "")
        + f"; urls {Path(args.output).parent / summary['urls']}"
    )
    return 0
