"""Training-step speed: mimscale's DeepSpeed step vs Hugging Face's ViTMAE, MAE vs SimMIM, FLOPs, MFU.

Usage (from the repository root)::

    python benchmarks/train_step.py                                  # MAE ViT-B/16, CPU defaults
    python benchmarks/train_step.py --recipe mae_vitl --batch 128 --steps 20     # on a GPU
    python benchmarks/train_step.py --recipe mae_vitb --peak-tflops 989 --compile

For the recipe's method and model (``--recipe`` names a file in ``recipes/``; ``--model`` swaps
the timm architecture), one process measures, interleaved step by step so that load from other
processes hits every variant alike:

* mimscale: the step as the training loop runs it: ``normalize_on_device`` of a uint8 batch, the
  method's forward, ``engine.backward``, ``engine.step`` of a DeepSpeed engine (world size 1,
  the DeepSpeed config from ``build_ds_config``: torch's fused AdamW, and for ZeRO-1/2 without
  clipping no global gradient norm; ZeRO stage from ``--ds-config``).
* Hugging Face ``transformers.ViTMAEForPreTraining`` with the same encoder/decoder sizes, mask
  ratio and norm-pix loss, SDPA attention, the same batch and thread count, twice:

  - ``hf_ds``: in a DeepSpeed engine built exactly like mimscale's (same ``--ds-config``, optimizer
    section, parameter groups, precision). This is the like-for-like comparison of the two model
    implementations, and its ratio is the target (mimscale / HF <= 1.0).
  - ``hf``: plain PyTorch, ``torch.optim.AdamW`` with the same hyper-parameters and the same
    implementation as mimscale's optimizer (fused exactly when it is), bf16 autocast on GPU. The
    ratio ``hf_ds / hf`` is the DeepSpeed engine's own per-step cost (ZeRO's flat-buffer copies),
    which is large on a CPU at small batches and shared by anything trained with DeepSpeed.

  Printed: which optimizer each side runs, and the ratios.
* SimMIM (``create_method("simmim")``) on the same ViT: the full-token encoder. The MAE paper
  reports ~3x less encoder compute for MAE at 75% masking (``--no-simmim`` skips it).

It prints the median step time and images/s after ``--warmup`` steps, the model FLOPs per image
(analytic, :func:`mimscale.flops.method_flops`, cross-checked by counting one forward with
``FlopCounterMode``, which counts fused attention), achieved TFLOP/s and MFU against
``--peak-tflops`` or the bf16 dense peak detected from the GPU's name.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mimscale.data.pipeline import normalize_on_device  # noqa: E402
from mimscale.flops import count_flops, detect_peak_tflops, method_flops  # noqa: E402
from mimscale.methods.base import Method, create_method  # noqa: E402
from mimscale.train.cpu_ranks import flush_denormals, retain_freed_memory  # noqa: E402
from mimscale.train.grad_rules import base_optimizer  # noqa: E402


def load_recipe(name: str) -> Any:
    """A registered recipe's config by name (``mae_vitl``), or the ``CONFIG`` of a recipe file path."""
    from mimscale.recipes import load_recipe as registered

    if not name.endswith(".py"):
        return registered(name)
    path = Path(name)
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"no recipe at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CONFIG


def fused_attention(module: torch.nn.Module) -> tuple[int, int]:
    """(blocks using F.scaled_dot_product_attention, attention blocks) in a timm model."""
    attns = [m for m in module.modules() if hasattr(m, "fused_attn")]
    return sum(bool(m.fused_attn) for m in attns), len(attns)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# the three steps


def build_engine(
    method: torch.nn.Module,
    cfg: Any,
    batch: int,
    ds_config: str,
    on_gpu: bool,
    compile_: bool,
    unfused_adam: bool = False,
) -> Any:
    """A world-size-1 DeepSpeed engine built by the trainer's own :func:`mimscale.train.optim.build_engine`
    (for any module whose forward takes the image batch and returns an object with ``.loss``: a mimscale
    method, or HF's MAE), with the recipe's optimizer and schedule at batch ``batch``.

    ``unfused_adam``: torch AdamW without its fused kernel (the loop's CPU optimizer before it was fused).
    """
    from mimscale.train import config as C
    from mimscale.train.deepspeed_config import load_ds_config
    from mimscale.train.optim import build_engine as trainer_engine

    user, _ = load_ds_config(ds_config)
    cfg = dataclasses.replace(cfg, global_batch=batch, max_micro_batch=batch, compile=compile_)
    plan = C.plan_run(cfg, 1, on_gpu, on_gpu and torch.cuda.is_bf16_supported())

    def unfuse(ds_cfg: dict[str, Any]) -> None:
        if unfused_adam and "torch_adam" in ds_cfg["optimizer"]["params"]:
            ds_cfg["optimizer"]["params"].pop("fused", None)

    return trainer_engine(method, cfg, plan, user, adjust_ds_config=unfuse).engine


def adam_impl(opt: torch.optim.Optimizer) -> str:
    """Which of torch's Adam implementations ``step`` runs: fused, foreach or the per-tensor for-loop."""
    if opt.defaults.get("fused"):
        return "fused"
    foreach = opt.defaults.get("foreach")
    if foreach is None:  # torch's default: foreach for CUDA tensors, the for-loop otherwise
        foreach = all(p.is_cuda for g in opt.param_groups for p in g["params"])
    return "foreach" if foreach else "for-loop"


def describe_engine(engine: Any) -> str:
    opt = base_optimizer(engine)
    text = f"{type(opt).__module__}.{type(opt).__name__} ({adam_impl(opt)})"
    if engine.optimizer is not opt:
        text += f" in {type(engine.optimizer).__name__}"
    stage = engine.zero_optimization_stage()
    text += f", ZeRO stage {stage}"
    if stage in (1, 2):
        norm = engine._config.zero_config.compute_grad_norm
        text += f", global grad norm {'on' if norm else 'off'}"
    return text


def mimscale_step(engine: Any, images_u8: torch.Tensor, device: torch.device) -> Callable[[], None]:
    dtype = (
        torch.bfloat16
        if engine.bfloat16_enabled()
        else torch.float16
        if engine.fp16_enabled()
        else torch.float32
    )

    def step() -> None:
        images = normalize_on_device(images_u8, device, dtype)
        out = engine(images)
        engine.backward(out.loss)
        engine.step()

    return step


def hf_mae(method: Method, device: torch.device) -> torch.nn.Module:
    """transformers' ViTMAEForPreTraining with the sizes of mimscale's MAE ``method``."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    enc, dec = method.encoder, method.decoder
    blk, dblk = enc.blocks[0], dec.decoder_blocks[0]
    config = ViTMAEConfig(
        hidden_size=enc.embed_dim,
        num_hidden_layers=len(enc.blocks),
        num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features,
        image_size=enc.grid[0] * enc.patch_size,
        patch_size=enc.patch_size,
        num_channels=enc.in_chans,
        qkv_bias=True,
        layer_norm_eps=1e-6,
        decoder_hidden_size=dec.decoder_embed.out_features,
        decoder_num_hidden_layers=len(dec.decoder_blocks),
        decoder_num_attention_heads=dblk.attn.num_heads,
        decoder_intermediate_size=dblk.mlp.fc1.out_features,
        mask_ratio=float(method.masker.mask_ratio),
        norm_pix_loss=bool(method.norm_pix_loss),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    try:
        model = ViTMAEForPreTraining(config, attn_implementation="sdpa")
    except TypeError:
        config._attn_implementation = "sdpa"
        model = ViTMAEForPreTraining(config)
    return model.to(device).train()


def hf_step(
    model: torch.nn.Module, images: torch.Tensor, cfg: Any, device: torch.device, like: torch.optim.Optimizer
) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """HF forward/backward and torch AdamW with ``like``'s lr and implementation (fused / foreach)."""
    o = cfg.optim
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=like.param_groups[0]["lr"],
        betas=tuple(o.betas),
        eps=o.eps,
        fused=like.defaults.get("fused"),
        foreach=like.defaults.get("foreach"),
    )
    autocast = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(pixel_values=images).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="mae_vitb", help="recipe name in recipes/ (or a path)")
    parser.add_argument("--model", default=None, help="override the recipe's timm model_name")
    parser.add_argument(
        "--batch", type=int, default=None, help="per-step batch (default 4 on CPU, 64 on GPU)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 5 / 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 / 5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ds-config", default="zero2.json", help="shipped name or path (default zero2.json)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: detected)")
    parser.add_argument("--compile", action="store_true", help="engine.compile() the mimscale step")
    parser.add_argument(
        "--unfused-adam",
        action="store_true",
        help="torch AdamW without the fused kernel, for mimscale and HF alike (for-loop on CPU, foreach on "
        "CUDA; the loop's CPU optimizer before it was fused)",
    )
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--no-simmim", action="store_true", help="skip the SimMIM comparison")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="CPU: leave glibc's malloc as it is instead of retaining freed blocks as the training loop "
        "does on CPU ranks (mimscale.train.cpu_ranks); shows what per-step page faults cost DeepSpeed",
    )
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    # As the loop sets up a CPU rank, before any thread pool starts (threads inherit the FP mode), for
    # the whole process: every variant below runs with the same settings.
    retained = not on_gpu and not args.default_malloc and retain_freed_memory()
    ftz = not on_gpu and flush_denormals()

    from mimscale.train.distributed import init_distributed

    init_distributed()  # a world of one in this process (sets RANK/WORLD_SIZE/MASTER_* if unset)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    batch = args.batch or (64 if on_gpu else 4)
    steps = args.steps or (20 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)

    cfg = load_recipe(args.recipe)
    model_kwargs = dict(cfg.model)
    if args.model:
        model_kwargs["model_name"] = args.model
    torch.manual_seed(0)
    method = create_method(cfg.method, **model_kwargs)
    if cfg.grad_checkpointing:
        method.set_grad_checkpointing(True)
    enc = method.encoder
    img = enc.grid[0] * enc.patch_size
    fused, n_attn = fused_attention(method)
    flops = method_flops(method)
    with torch.no_grad():
        x1 = torch.randn(1, enc.in_chans, img, img)
        counted, _ = count_flops(method, x1)
    dev_name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({os.cpu_count()} cores)"
    print(
        f"{args.recipe}: {cfg.method} {model_kwargs.get('model_name')}, {img}px, batch {batch}, "
        f"{steps} timed steps after {warmup} warm-up, {args.threads} threads, {dev_name}, "
        f"DeepSpeed {args.ds_config}{', compiled' if args.compile else ''}"
        f"{', unfused AdamW' if args.unfused_adam else ''}"
        f"{', malloc retains freed blocks' if retained else ''}{', denormals flushed' if ftz else ''}"
    )
    print(f"fused attention (F.scaled_dot_product_attention): {fused}/{n_attn} attention blocks")
    print(f"model FLOPs/image: {flops}; FlopCounterMode forward: {counted / 1e9:.2f} GFLOPs")

    images_u8 = torch.randint(0, 256, (batch, enc.in_chans, img, img), dtype=torch.uint8, device=device)
    engine = build_engine(method, cfg, batch, args.ds_config, on_gpu, args.compile, args.unfused_adam)
    print(f"optimizer, mimscale: {describe_engine(engine)}")
    variants: dict[str, Callable[[], None]] = {"mimscale": mimscale_step(engine, images_u8, device)}
    if not args.no_hf:
        if cfg.method != "mae":
            print("HF baseline: skipped (ViTMAEForPreTraining only matches the MAE method)")
        else:
            model = hf_mae(method, device)
            images = normalize_on_device(images_u8, device, torch.float32)
            variants["hf"], hf_opt = hf_step(model, images, cfg, device, base_optimizer(engine))
            print(f"optimizer, HF:       torch.optim.AdamW ({adam_impl(hf_opt)}), plain PyTorch (no engine)")
            # The like-for-like comparison: HF's model in the same DeepSpeed engine and config as mimscale's.
            hf_engine = build_engine(
                hf_mae(method, device), cfg, batch, args.ds_config, on_gpu, args.compile, args.unfused_adam
            )
            variants["hf_ds"] = mimscale_step(hf_engine, images_u8, device)
            print(f"optimizer, HF in DS: {describe_engine(hf_engine)}")
    simmim_flops = None
    if not args.no_simmim and cfg.method == "mae":
        sim_kwargs = {
            k: v
            for k, v in model_kwargs.items()
            if k not in ("mask_ratio", "norm_pix_loss") and not k.startswith("decoder_")
        }
        simmim = create_method("simmim", **sim_kwargs)
        simmim_flops = method_flops(simmim)
        variants["simmim"] = mimscale_step(
            build_engine(simmim, cfg, batch, args.ds_config, on_gpu, args.compile, args.unfused_adam),
            images_u8,
            device,
        )

    # Wall time per step, and on CPU also this process's CPU time (all its threads), which load from
    # other processes on a shared machine disturbs much less.
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + steps):
        for name, step in variants.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        if i >= warmup:
            print(
                f"  step {i - warmup + 1}/{steps}: "
                + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
                flush=True,
            )

    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    peak = args.peak_tflops or detect_peak_tflops(torch.cuda.get_device_name(device) if on_gpu else "")
    print(
        f"\nmedians over {steps} steps (wall clock"
        + ("" if on_gpu else "; CPU seconds of this process")
        + ")"
    )
    for name, t in med.items():
        line = f"{name:>9s}: {t * 1e3:8.1f} ms/step  {batch / t:8.1f} img/s"
        if not on_gpu:
            line += f"  (CPU {med_cpu[name]:.2f} s/step)"
        f = flops if name != "simmim" else simmim_flops
        if not name.startswith("hf") and f is not None:
            tflops = f.train * batch / t / 1e12
            mfu = (
                f"  MFU {100 * tflops / peak:.1f}% of {peak:.0f}" if peak else "  MFU n/a (no --peak-tflops)"
            )
            line += f"  {tflops:.3f} TFLOP/s{mfu}"
        print(line)

    def ratio(a: str, b: str) -> str:
        text = f"{med[a] / med[b]:.2f}"
        return text if on_gpu else text + f" (CPU time {med_cpu[a] / med_cpu[b]:.2f})"

    if "hf_ds" in med:
        print(
            f"mimscale / HF ViTMAEForPreTraining, both in the same DeepSpeed engine ({args.ds_config}): "
            f"{ratio('mimscale', 'hf_ds')}  (target <= 1.0)"
        )
    if "hf" in med:
        print(f"mimscale (DeepSpeed) / HF in plain PyTorch: {ratio('mimscale', 'hf')}")
        if "hf_ds" in med:
            print(f"  of which the DeepSpeed engine's own per-step cost, HF in DeepSpeed / HF plain: "
                  f"{ratio('hf_ds', 'hf')}")
    if "simmim" in med:
        print(
            f"SimMIM / MAE step time on {model_kwargs.get('model_name')}: {ratio('simmim', 'mimscale')}"
            f"  (model FLOPs ratio {simmim_flops.forward / flops.forward:.2f})"
        )


if __name__ == "__main__":
    from mimscale.train.distributed import run_and_exit

    run_and_exit(main)  # then release /dev/shm, destroy the process group, exit without finalization
