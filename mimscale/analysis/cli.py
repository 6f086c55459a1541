"""``mimscale analyze``: what checkpoints learned, side by side.

    mimscale analyze --weights runs/mae runs/lut --labels mae lut --data 'val-{000000..000003}.tar' \\
        --output analysis/ [--num-images 256] [--layers all] [--compare-to-random]

Writes ``analysis.json`` and ``attention_distance.png``, ``singular_values.png``, ``attention_maps.png`` and,
for checkpoints that keep a pixel decoder, ``reconstructions.png`` into ``--output``. Every checkpoint sees
the same images (the first ``--num-images`` of ``--data`` in shard order), each at its own image size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run_analyze"]

DEFINITIONS = {
    "attention_distance_px": (
        "per block and head: attention probabilities among patch tokens only (prefix rows and columns "
        "dropped, rows renormalised over patch keys) times the Euclidean distance in pixels between query "
        "and key patch centres (grid distance x patch size), summed over keys, averaged over queries and "
        "images; probabilities recomputed from the block's own q, k and biases and checked against its output"
    ),
    "singular_values": (
        "patch tokens after the block (residual stream, before the final norm): per image the singular "
        "values of the un-centred T x D matrix divided by that image's largest, averaged over images"
    ),
    "effective_rank": (
        "exp of the entropy of the singular values normalised to sum to 1 (Roy & Vetterli 2007)"
    ),
    "attention_maps": "the CLS token's attention over the patches in the last block, renormalised over them",
    "layers": "block indices are 0-based",
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``analyze`` on the ``mimscale`` command."""
    p = subparsers.add_parser(
        "analyze",
        help="attention distance, singular-value spectra, attention maps and reconstructions of checkpoints",
        description="What checkpoints learned, side by side: mean attention distance per head, "
        "singular-value spectra of patch tokens, CLS attention maps, and reconstructions for methods with a "
        "pixel decoder. Writes analysis.json and one PNG per analysis into --output.",
    )
    p.add_argument("--weights", nargs="+", required=True, metavar="W",
                   help="export .safetensors, run or checkpoint directory (any ZeRO stage), or timm folder")
    p.add_argument("--labels", nargs="+", default=None,
                   help="one name per --weights (default: the method, else the file name)")
    p.add_argument("--data", required=True, help="WebDataset shards, e.g. 'val-{000000..000003}.tar'")
    p.add_argument("--output", required=True, help="directory for analysis.json and the figures")
    p.add_argument("--num-images", type=int, default=256, help="the first N images of --data (default 256)")
    p.add_argument("--layers", nargs="+", default=["last"],
                   help="blocks whose singular-value spectrum is measured: 'all', 'last' (default) or "
                   "0-based indices (negative from the end); attention distance always covers every block")
    p.add_argument("--compare-to-random", action="store_true",
                   help="add a randomly initialised encoder of the same architecture as a baseline")
    p.add_argument("--which", default="auto", choices=["auto", "student", "teacher"],
                   help="network of EMA-teacher methods (auto: the one the paper evaluates)")
    p.add_argument("--figure-images", type=int, default=4,
                   help="images shown in attention_maps.png and reconstructions.png (default 4)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="masks of the reconstructions and random baselines")
    p.set_defaults(func=run_analyze)
    return p


def _say(msg: str) -> None:
    print(f"[analyze] {msg}", flush=True)


class _Progress:
    """A line per ~2 s (and at the end) with images/s and ETA."""

    def __init__(self, what: str, total: int, every_s: float = 2.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta))
        _say(f"{self.what}: {done}/{self.total} images  {rate:.1f} img/s  ETA {eta_text}")


def _check_layer_tokens(tokens: list[str]) -> None:
    for t in tokens:
        if t in ("all", "last"):
            continue
        try:
            int(t)
        except ValueError:
            raise ValueError(f"--layers {t!r}: expected 'all', 'last' or block indices (0-based)") from None


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: no CUDA device is available here; use cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return dev


def _validate(args: argparse.Namespace) -> None:
    if args.labels is not None and len(args.labels) != len(args.weights):
        raise ValueError(f"--labels: {len(args.labels)} labels for {len(args.weights)} --weights; "
                         "give one label per --weights")
    if args.labels is not None and len(set(args.labels)) != len(args.labels):
        raise ValueError(f"--labels {args.labels}: labels must be distinct")
    for name, value, low in (("--num-images", args.num_images, 1), ("--batch-size", args.batch_size, 1),
                             ("--figure-images", args.figure_images, 0)):
        if value < low:
            raise ValueError(f"{name} {value}: expected >= {low}")
    _check_layer_tokens(args.layers)


def _default_labels(loaded: list[Any]) -> list[str]:
    names = [enc.method or Path(enc.source.rstrip("/")).stem or "model" for enc in loaded]
    out: list[str] = []
    for n in names:
        label, k = n, 2
        while label in out:
            label, k = f"{n}-{k}", k + 1
        out.append(label)
    return out


# Keyword arguments that change training only (dropout, stochastic depth): the same eval-mode network.
_TRAIN_ONLY_KWARGS = {"drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
                      "drop_path_rate"}


def _random_baselines(loaded: list[Any], labels: list[str], seed: int) -> list[tuple[str, Any, dict]]:
    """One randomly initialised timm encoder (timm's own init, seeded) per distinct architecture among the
    checkpoints, labelled after the first checkpoint it mirrors when there are several."""
    import timm
    import torch

    archs: dict[str, tuple[str, dict, str]] = {}
    for enc, label in zip(loaded, labels):
        kwargs = {k: v for k, v in enc.model_kwargs.items() if k not in _TRAIN_ONLY_KWARGS}
        key = json.dumps([enc.model_name, kwargs], sort_keys=True)
        archs.setdefault(key, (enc.model_name, kwargs, label))
    out = []
    for name, kwargs, like in archs.values():
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
        label = "random init" if len(archs) == 1 else f"random init (as {like})"
        out.append((label, model, {"kind": "random-init", "timm_model": name, "timm_kwargs": kwargs,
                                   "seed": seed}))
    return out


def run_analyze(args: argparse.Namespace) -> int:
    import torch

    from mimscale.analysis.hooks import check_encoder, encoder_blocks, resolve_layers
    from mimscale.analysis.images import check_local_shards, prepare_images, read_images
    from mimscale.analysis.measure import has_cls_token, measure_encoder
    from mimscale.analysis.plots import (
        ModelCurves,
        plot_attention_distance,
        plot_attention_maps,
        plot_reconstructions,
        plot_singular_values,
    )
    from mimscale.analysis.reconstruction import DENORM_NOTE, load_method, reconstruct
    from mimscale.analysis.spectrum import effective_rank
    from mimscale.runs import atomic_write_text
    from mimscale.weights import load_encoder

    # ---- everything cheap and checkable first --------------------------------------------------------
    _validate(args)
    device = _device(args.device)
    check_local_shards(args.data)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--output {str(out_dir)!r} exists and is not a directory")

    loaded = []
    for w in args.weights:
        enc = load_encoder(w, which=args.which)
        try:
            check_encoder(enc.model)
        except ValueError as e:
            raise ValueError(f"--weights {w}: {e}") from None
        depth = len(encoder_blocks(enc.model))
        try:
            resolve_layers(args.layers, depth)
        except ValueError as e:
            raise ValueError(f"--layers for --weights {w} ({depth} blocks): {e}") from None
        loaded.append(enc)
        _say(f"loaded {w}: {enc.method or enc.format} {enc.model_name} {enc.img_size} px, {depth} blocks "
             f"({enc.which}, sha256 {enc.sha256[:12]})")
    labels = args.labels or _default_labels(loaded)

    images = read_images(args.data, args.num_images)
    notes: list[str] = []
    for err in images.errors[:5]:
        _say(f"skipped: {err}")
    if len(images) == 0:
        raise ValueError(f"--data {args.data!r}: no readable image in the shards"
                         + (f" ({images.errors[0]})" if images.errors else ""))
    if len(images) < args.num_images:
        notes.append(f"--num-images {args.num_images} asked, the shards hold {len(images)} readable images: "
                     f"all {len(images)} used")
        _say(notes[-1])
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- measurements ----------------------------------------------------------------------------------
    models: list[tuple[str, Any, dict, Any]] = [
        (label, enc.model, {"kind": "weights", **enc.describe()}, enc) for label, enc in zip(labels, loaded)
    ]
    if args.compare_to_random:
        baselines = _random_baselines(loaded, labels, args.seed)
        models += [(label, model, info, None) for label, model, info in baselines]
    prepared: dict[int, torch.Tensor] = {}
    records, curves, map_entries, recon_entries = [], [], [], []
    n_fig = min(args.figure_images, len(images))
    for label, model, info, enc in models:
        size = int(model.patch_embed.img_size[0])
        if size not in prepared:
            prepared[size] = prepare_images(images.images, size)
        x = prepared[size]
        model.to(device)
        m = measure_encoder(model, x, spectrum_layers=args.layers, batch_size=args.batch_size,
                            map_images=n_fig, progress=_Progress(label, x.shape[0]))
        model.to("cpu")
        ranks = {i: effective_rank(s) for i, s in m.spectra.items()}
        depth, heads = m.attention_distance.shape
        rec: dict[str, Any] = {
            "label": label,
            **info,
            "img_size": size,
            "patch_size": list(m.patch_size),
            "grid": list(m.grid),
            "depth": depth,
            "heads": heads,
            "num_prefix_tokens": m.num_prefix_tokens,
            "num_images": m.num_images,
            "attention_distance_px": {
                "per_head": m.attention_distance.tolist(),
                "mean_over_heads": m.attention_distance.mean(dim=1).tolist(),
            },
            "singular_values": {str(i): s.tolist() for i, s in m.spectra.items()},
            "effective_rank": {str(i): r for i, r in ranks.items()},
        }
        if m.cls_maps is not None:
            map_entries.append((label, x[:n_fig], m.cls_maps, depth - 1))
            rec["attention_maps"] = {"block": depth - 1, "images": int(m.cls_maps.shape[0])}
        elif n_fig:
            rec["attention_maps"] = {"skipped": "no CLS token" if not has_cls_token(model) else "no images"}
        if enc is not None and n_fig:
            method, why = load_method(enc.source)
            if method is None:
                rec["reconstruction"] = {"skipped": why}
                _say(f"{label}: no reconstructions ({why})")
            else:
                method.to(device)
                size = method.encoder.grid[0] * method.encoder.patch_size
                rows, how = reconstruct(method, prepare_images(images.images[:n_fig], size), seed=args.seed)
                method.to("cpu")
                del method
                rec["reconstruction"] = how
                recon_entries.append((label, rows))
        mean = m.attention_distance.mean(dim=1)
        _say(f"{label}: mean attention distance per block (px) {[round(float(v), 2) for v in mean]}; "
             f"effective rank {({i: round(r, 2) for i, r in ranks.items()})}")
        records.append(rec)
        spectra = {i: s.numpy() for i, s in m.spectra.items()}
        curves.append(ModelCurves(label, m.attention_distance.numpy(), spectra, ranks, baseline=enc is None))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- figures and report ----------------------------------------------------------------------------
    figures = {
        "attention_distance": plot_attention_distance(curves, out_dir / "attention_distance.png").name,
        "singular_values": plot_singular_values(curves, out_dir / "singular_values.png").name,
    }
    if map_entries:
        figures["attention_maps"] = plot_attention_maps(map_entries, out_dir / "attention_maps.png").name
    if recon_entries:
        title = "Reconstructions (masked patches grey; visible patches pasted back)"
        normed = [r["label"] for r in records if r.get("reconstruction", {}).get("denormalised")]
        if normed:
            title += f"\n{', '.join(normed)}: {DENORM_NOTE}"
        figures["reconstructions"] = plot_reconstructions(recon_entries, title,
                                                          out_dir / "reconstructions.png").name
    report = {
        "command": ("mimscale analyze " + " ".join(sys.argv[2:])) if sys.argv[1:2] == ["analyze"] else None,
        "data": args.data,
        "num_images_requested": args.num_images,
        "num_images": len(images),
        "images": images.keys,
        "read_errors": images.errors[:100],
        "notes": notes,
        "device": str(device),
        "definitions": DEFINITIONS,
        "models": records,
        "figures": figures,
    }
    atomic_write_text(out_dir / "analysis.json", json.dumps(report, indent=1))
    _say(f"wrote {out_dir / 'analysis.json'} and {', '.join(figures.values())}")
    return 0

