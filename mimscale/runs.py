"""The on-disk layout of a pretraining run, read by the trainer's checkpointer, the export and the tools:

    <run>/config.json, ds_config.json, metrics.jsonl, tensorboard/, loss.png, reconstructions.png
    <run>/checkpoints/latest                    the tag of the newest complete checkpoint
    <run>/checkpoints/step_00001000/            one checkpoint (a "tag"):
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's own shards, every rank's
        extra_rank00000.pt ...                  per-rank RNG states and method state (EMA shadows)
        mimscale.json                           :class:`RunMeta`: what was trained and how to rebuild it

Writing is the trainer's job (``mimscale.train.checkpoint``); this module only names and reads things, so
export and evaluation code never import the trainer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "LATEST",
    "MANIFEST",
    "check_files",
    "file_digest",
    "list_tags",
    "manifest_bytes",
    "rank_owns",
    "read_manifest",
    "write_manifest",
    "META_FILE",
    "RunMeta",
    "TAG_RE",
    "atomic_torch_save",
    "atomic_write_text",
    "extra_file",
    "read_latest",
    "read_rank_states",
    "resolve_checkpoint",
    "tag_for",
    "tag_step",
]

LATEST = "latest"
META_FILE = "mimscale.json"
TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag: str) -> int | None:
    """The step of a ``step_*`` tag, None for any other name."""
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def extra_file(tag_dir: str | Path, rank: int) -> Path:
    """The file holding ``rank``'s RNG states and method state in a checkpoint."""
    return Path(tag_dir) / f"extra_rank{rank:05d}.pt"


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file, fsync, rename: readers see the old or the new text, never a part."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_latest(root: str | Path) -> str | None:
    """The tag in ``root/latest`` if it names an existing directory, else None."""
    f = Path(root) / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if tag and (Path(root) / tag).is_dir() else None


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """Accept a run dir, its ``checkpoints/`` dir, or a tag dir; return (checkpoints root, tag): the tag
    ``latest`` names, or (``latest`` broken) the newest tag whose manifest lists files of the right sizes."""
    p = Path(path)
    for root in (p / "checkpoints", p):
        tag = read_latest(root)
        if tag is not None:
            return root, tag
        for tag in list_tags(root):
            manifest = read_manifest(root / tag)
            if manifest is not None and all(
                (root / tag / n).is_file() and (root / tag / n).stat().st_size == int(f["size"])
                for n, f in manifest["files"].items()
            ):
                return root, tag
    if p.is_dir() and (p / META_FILE).is_file():
        return p.parent, p.name
    raise FileNotFoundError(
        f"--checkpoint {str(path)!r}: no checkpoint found (expected a run directory with "
        "checkpoints/latest, a checkpoints directory, or a step_* tag directory)"
    )


@dataclass
class RunMeta:
    """What a checkpoint holds and how to rebuild it, written by rank 0 into every tag (``mimscale.json``).

    The JSON keys are the names the safetensors export's metadata uses (``timm.model_name``, ...).
    """

    method: str
    recipe: str
    timm_model_name: str
    timm_kwargs: dict[str, Any]
    encoder_prefix: str  # state-dict prefix of the encoder's timm module inside the method
    zero_stage: int
    world_size: int
    config: dict[str, Any] = field(default_factory=dict)  # the resolved recipe config (TrainConfig as a dict)
    step: int = 0
    teacher_prefix: str | None = None  # state-dict prefix of the EMA teacher's timm encoder, if any
    evaluates_teacher: bool = False  # the paper evaluates (and releases) the teacher, not the student

    _JSON_KEYS = {"timm_model_name": "timm.model_name", "timm_kwargs": "timm.kwargs"}

    @classmethod
    def from_method(
        cls, method: Any, recipe: str, config: dict[str, Any], zero_stage: int, world_size: int
    ) -> RunMeta:
        timm_name, timm_kwargs, prefix = method.export_spec()
        return cls(
            method=method.name,
            recipe=recipe,
            timm_model_name=timm_name,
            timm_kwargs=dict(timm_kwargs),
            encoder_prefix=prefix,
            zero_stage=zero_stage,
            world_size=world_size,
            config=config,
            teacher_prefix=(
                method.teacher_export_prefix() if hasattr(method, "teacher_export_prefix") else None
            ),
            evaluates_teacher=bool(getattr(method, "evaluates_teacher", False)),
        )

    def to_json(self) -> str:
        d = {self._JSON_KEYS.get(f.name, f.name): getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunMeta:
        d = json.loads(text)
        names = {v: k for k, v in cls._JSON_KEYS.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {names.get(k, k): v for k, v in d.items() if names.get(k, k) in known}
        missing = known - set(kwargs) - {"config", "step", "teacher_prefix", "evaluates_teacher"}
        if missing:
            raise ValueError(
                f"{META_FILE} lacks {sorted(missing)}: not a mimscale checkpoint of this version"
            )
        return cls(**kwargs)

    @classmethod
    def read(cls, tag_dir: str | Path) -> RunMeta:
        path = Path(tag_dir) / META_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a mimscale checkpoint")
        return cls.from_json(path.read_text())

    def write(self, tag_dir: str | Path) -> None:
        atomic_write_text(Path(tag_dir) / META_FILE, self.to_json())


def read_rank_states(tag_dir: str | Path) -> list[dict[str, Any]]:
    """Every rank's method state (what ``Method.sharded_state_dict`` returned) in a checkpoint, in rank
    order: e.g. ``[s["ema"] for s in read_rank_states(tag)]`` to consolidate an EMA teacher."""
    files = sorted(Path(tag_dir).glob("extra_rank*.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no extra_rank*.pt files (not a mimscale checkpoint tag)")
    # RNG states and EMA shadows are tensors and plain containers mimscale wrote itself.
    return [torch.load(f, map_location="cpu", weights_only=False)["method"] for f in files]


# ---------------------------------------------------------------------------------------------------
# the manifest: what makes a checkpoint provably complete

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_HASH_CHUNK = 8 << 20


def file_digest(path: Path, sync: bool = False) -> dict[str, Any]:
    """Size and sha256 of a file (``sync``: also fsync it, so what was hashed is what stays on disk)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def rank_owns(name: str, rank: int) -> bool:
    """Whether ``rank`` wrote the checkpoint file ``name``: DeepSpeed's ``*_pp_rank_<r>_*`` shards and
    mimscale's ``extra_rank<r>.pt`` (rank 0 also takes the shared files, see :func:`write_manifest`)."""
    return bool(re.search(rf"(^|_)pp_rank_{rank}_", name)) or name == extra_file(".", rank).name


def read_manifest(tag_dir: str | Path) -> dict[str, Any] | None:
    path = Path(tag_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def manifest_bytes(manifest: dict[str, Any]) -> int:
    return sum(int(f["size"]) for f in manifest["files"].values())


def write_manifest(tag_dir: Path, files: dict[str, dict[str, Any]], step: int, world_size: int) -> None:
    """Written last, after every rank's files are on disk and hashed: its presence proves the tag complete."""
    manifest = {"version": MANIFEST_VERSION, "step": step, "world_size": world_size, "files": files}
    atomic_write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def check_files(tag_dir: Path, manifest: dict[str, Any], names: list[str]) -> list[str]:
    """Problems with the manifest's files ``names`` (missing, wrong size, wrong checksum), one line each."""
    problems = []
    for name in names:
        want = manifest["files"][name]
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != int(want["size"]):
            problems.append(f"{path} has {size} bytes, the manifest says {want['size']} (truncated?)")
            continue
        if file_digest(path)["sha256"] != want["sha256"]:
            problems.append(f"{path} does not match its sha256 in the manifest (corrupted)")
    return problems


def list_tags(root: str | Path) -> list[str]:
    """The ``step_*`` tags under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [d.name for d in root.iterdir() if d.is_dir() and tag_step(d.name) is not None]
    return sorted(tags, key=lambda t: tag_step(t) or 0, reverse=True)
