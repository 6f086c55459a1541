"""A whole plan: every part computed for one recipe on one cluster, as a table and as JSON.

:func:`make_plan` is the library entry point (``mimscale plan`` is its command line): it resolves the recipe,
takes the batch plan from :func:`mimscale.train.config.plan_run` (the one the trainer uses), counts parameters
and FLOPs on the meta device, measures activations (:mod:`mimscale.planning.activations`), and combines them
with the hardware (:mod:`mimscale.planning.presets`) into memory per ZeRO stage, time, data rate, checkpoint
size and shard-layout findings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mimscale.planning.activations import ActivationProfile, measure_activations
from mimscale.planning.checkpoint import CheckpointPlan, checkpoint_plan
from mimscale.planning.data import DataRate, data_rate, view_work
from mimscale.planning.memory import (
    GIB,
    MemoryPlan,
    ParamCounts,
    count_params,
    fit_micro_batch,
    model_states,
    zero_settings,
)
from mimscale.planning.presets import HOST, NET_GBS_PER_GPU, GpuPreset, gpu_preset
from mimscale.planning.recipe import build_method, load_config, planning_notes, validate_config, views_spec
from mimscale.planning.shards import DataSetInfo, Finding, dataset_info, shard_findings
from mimscale.planning.time import StepTime, comm_bytes_per_step, step_time
from mimscale.train.config import BatchPlan, ConfigError, TrainConfig, plan_run

__all__ = ["Cluster", "Plan", "make_plan", "render"]

STAGES = (1, 2, 3)


@dataclass(frozen=True)
class Cluster:
    """The hardware and assumptions a plan is made for."""

    gpus: int
    gpus_per_node: int = 8
    gpu: GpuPreset = field(default_factory=lambda: gpu_preset("h100-80gb"))
    cores_per_node: int | None = None
    mfu: float = 0.4
    margin: float = 0.1
    write_gbs: float = HOST.checkpoint_write_gbs
    net_gbs: float = NET_GBS_PER_GPU  # between nodes, per GPU and direction

    @property
    def link_gbs(self) -> float:
        """The slowest link a ring over all ranks crosses."""
        return self.gpu.link_gbs if self.nodes == 1 else min(self.gpu.link_gbs, self.net_gbs)

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)

    @property
    def ranks_per_node(self) -> int:
        return min(self.gpus, self.gpus_per_node)

    def check(self) -> None:
        checks = [
            ("--gpus", self.gpus, self.gpus >= 1, ">= 1"),
            ("--gpus-per-node", self.gpus_per_node, self.gpus_per_node >= 1, ">= 1"),
            (
                "--gpus",
                self.gpus,
                self.gpus <= self.gpus_per_node or self.gpus % self.gpus_per_node == 0,
                f"a multiple of --gpus-per-node {self.gpus_per_node} (whole nodes)",
            ),
            ("--mfu", self.mfu, 0 < self.mfu <= 1, "in (0, 1]"),
            ("--margin", self.margin, 0 <= self.margin < 1, "in [0, 1)"),
            ("--gpu-memory", self.gpu.memory_gib, self.gpu.memory_gib > 0, "> 0 GiB"),
            ("--gpu-peak", self.gpu.peak_tflops, self.gpu.peak_tflops > 0, "> 0 TFLOP/s"),
            (
                "--cores-per-node",
                self.cores_per_node,
                self.cores_per_node is None or self.cores_per_node >= 1,
                ">= 1",
            ),
            ("--write-gbs", self.write_gbs, self.write_gbs > 0, "> 0 GB/s"),
            ("--net-gbs", self.net_gbs, self.net_gbs > 0, "> 0 GB/s"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{name} {value}: expected {allowed}")


@dataclass
class Plan:
    recipe: str
    cfg: TrainConfig
    cluster: Cluster
    ds_config: str
    chosen_stage: int
    precision: str
    batch: BatchPlan
    total_steps: int
    steps_per_epoch: int
    counts: ParamCounts
    activations: ActivationProfile
    memory: dict[tuple[int, bool], MemoryPlan]  # (stage, activation checkpointing) -> plan
    time: StepTime
    data: DataRate
    dataset: DataSetInfo
    checkpoint: CheckpointPlan
    findings: list[Finding]
    notes: list[str]

    @property
    def chosen(self) -> MemoryPlan:
        return self.memory[(self.chosen_stage, self.cfg.grad_checkpointing)]

    def to_dict(self) -> dict[str, Any]:
        c = self.cluster
        return {
            "recipe": self.recipe,
            "method": self.cfg.method,
            "model": self.cfg.model.get("model_name"),
            "cluster": {
                "gpus": c.gpus,
                "gpus_per_node": c.gpus_per_node,
                "nodes": c.nodes,
                "gpu": c.gpu.name,
                "gpu_memory_gib": c.gpu.memory_gib,
                "peak_tflops": c.gpu.peak_tflops,
                "cores_per_node": c.cores_per_node,
                "mfu": c.mfu,
                "margin": c.margin,
                "write_gbs": c.write_gbs,
            },
            "ds_config": self.ds_config,
            "zero_stage": self.chosen_stage,
            "grad_checkpointing": self.cfg.grad_checkpointing,
            "precision": self.precision,
            "batch": dict(self.batch.__dict__),
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.cfg.optim.epochs,
            "params": {
                "trainable": self.counts.trainable,
                "frozen": self.counts.frozen,
                "ema": self.counts.ema,
                "largest_layer": self.counts.largest_layer,
            },
            "activations": self.activations.to_dict(),
            "memory": [
                {**m.to_dict(), "grad_checkpointing": ck} for (s, ck), m in sorted(self.memory.items())
            ],
            "time": self.time.to_dict(),
            "data": self.data.to_dict(),
            "dataset": self.dataset.to_dict(),
            "checkpoint": self.checkpoint.to_dict(),
            "findings": [f.__dict__ for f in self.findings],
            "notes": self.notes,
        }


def _stage_config(stage: int, chosen: dict[str, Any], chosen_stage: int) -> dict[str, Any]:
    """The run's own DeepSpeed config for its stage; the shipped file for the other stages."""
    from mimscale.train.deepspeed_config import load_ds_config

    if stage == chosen_stage:
        return chosen
    return load_ds_config(f"zero{stage}.json")[0]


def make_plan(
    recipe: str,
    cluster: Cluster,
    *,
    ds_config: str = "zero2.json",
    overrides: list[str] = (),
    data: str | None = None,
    images: int | None = None,
    mean_jpeg_kb: float | None = None,
) -> Plan:
    """Plan recipe ``recipe`` (registered name or recipe file) on ``cluster``; ConfigError/ValueError on bad
    input, raised before the (seconds-long) activation measurement."""
    from mimscale.flops import method_flops
    from mimscale.train.deepspeed_config import load_ds_config, zero_stage

    cluster.check()
    if images is not None and images < 1:
        raise ConfigError(f"--images {images}: expected >= 1")
    if mean_jpeg_kb is not None and not mean_jpeg_kb > 0:
        raise ConfigError(f"--mean-jpeg-kb {mean_jpeg_kb}: expected > 0")
    cfg, name = load_config(recipe, list(overrides))
    user_ds, ds_source = load_ds_config(ds_config)
    validate_config(cfg, ds_config, cluster.gpus)
    chosen_stage = zero_stage(user_ds)
    run = plan_run(cfg, cluster.gpus, on_gpu=True, bf16_supported=cluster.gpu.bf16)
    info = dataset_info(data, images, mean_jpeg_kb)
    method = build_method(cfg, "meta")
    counts = count_params(method)
    spec = views_spec(cfg, method)
    param_bytes = 4 if run.precision == "fp32" else 2
    try:
        flops = method_flops(method)
    except (AttributeError, TypeError):
        flops = None  # not a ViT encoder (BEiT's dVAE tokenizer): use the counted FLOPs

    acts = measure_activations(cfg, torch.float32 if param_bytes == 4 else torch.bfloat16, method=method)
    device = int(cluster.gpu.memory_gib * GIB)
    memory: dict[tuple[int, bool], MemoryPlan] = {}
    stages = sorted({*STAGES, chosen_stage})  # ZeRO-0 only when the config asks for it
    for stage in stages:
        zero = zero_settings(_stage_config(stage, user_ds, chosen_stage))
        states = model_states(counts, zero, cluster.gpus, cluster.ranks_per_node, param_bytes)
        for ckpt in (False, True):
            per_image = acts.per_image_checkpointed if ckpt else acts.per_image
            fit = fit_micro_batch(states, per_image, device, cluster.margin)
            memory[(stage, ckpt)] = MemoryPlan(
                states, per_image, run.batch.micro_batch, device, cluster.margin, fit
            )

    zero = zero_settings(user_ds)
    t = step_time(
        flops,
        acts.counted_train_flops,
        global_batch=cfg.global_batch,
        world_size=cluster.gpus,
        total_steps=run.stop_step,
        peak_tflops=cluster.gpu.peak_tflops,
        mfu=cluster.mfu,
        comm_bytes=comm_bytes_per_step(counts, zero, cluster.gpus, run.batch.accumulation, param_bytes),
        link_gbs=cluster.link_gbs,
        overlap=zero.overlap_comm,
    )
    images_per_s = cfg.global_batch / (t.step_s_checkpointed if cfg.grad_checkpointing else t.step_s)
    work = view_work(spec)
    rate = data_rate(
        images_per_s,
        cluster.nodes,
        work,
        info.mean_jpeg_kb,
        cluster.cores_per_node,
        cfg.data.num_workers,
        single_view=work.views == 1,
    )
    ckpt_plan = checkpoint_plan(
        counts, chosen_stage, cluster.gpus, param_bytes, cluster.write_gbs, cfg.ckpt_interval, run.stop_step
    )
    plan = Plan(
        name,
        cfg,
        cluster,
        ds_source,
        chosen_stage,
        run.precision,
        run.batch,
        run.stop_step,
        run.steps_per_epoch,
        counts,
        acts,
        memory,
        t,
        rate,
        info,
        ckpt_plan,
        [],
        planning_notes(cfg),
    )
    plan.findings = findings(plan)
    return plan


def _divisor_at_most(n: int, cap: int) -> int:
    return max((d for d in range(1, min(n, cap) + 1) if n % d == 0), default=0)


def findings(plan: Plan) -> list[Finding]:
    """Everything the plan should make the user change, worst first."""
    out: list[Finding] = []
    cfg, c, b = plan.cfg, plan.cluster, plan.batch
    m = plan.chosen
    per_rank = b.global_batch // b.world_size
    ck = "with" if cfg.grad_checkpointing else "without"
    if m.fits:
        out.append(
            Finding(
                "ok",
                f"ZeRO-{plan.chosen_stage} {ck} activation checkpointing fits micro batch "
                f"{b.micro_batch}: {m.peak / GIB:.1f} of {m.usable / GIB:.1f} GiB usable",
            )
        )
    else:
        fix = []
        for stage, ckpt in sorted(plan.memory, key=lambda k: (k[1], k[0])):
            alt = plan.memory[(stage, ckpt)]
            best = _divisor_at_most(per_rank, alt.max_micro_batch)
            if best:
                fix.append(
                    f"ZeRO-{stage}{' + checkpointing' if ckpt else ''} at --set max_micro_batch={best}"
                    + (" --set grad_checkpointing=true" if ckpt and not cfg.grad_checkpointing else "")
                )
        out.append(
            Finding(
                "error",
                f"ZeRO-{plan.chosen_stage} {ck} activation checkpointing does not fit micro "
                f"batch {b.micro_batch}: peak {m.peak / GIB:.1f} GiB > {m.usable / GIB:.1f} "
                "GiB usable",
                "; or ".join(fix[:3]) or "more GPUs, or a GPU with more memory",
            )
        )
    best = _divisor_at_most(per_rank, m.max_micro_batch)
    if m.fits and best > b.micro_batch and b.accumulation > 1:
        out.append(
            Finding(
                "ok",
                f"micro batch up to {m.max_micro_batch} fits; {best} (a divisor of the per-rank "
                f"batch {per_rank}) would cut accumulation from {b.accumulation} to "
                f"{per_rank // best}",
                f"--set max_micro_batch={best}",
            )
        )
    t = plan.time
    if t.comm_bound:
        fix = "fewer GPUs, a larger global batch"
        if plan.chosen_stage == 3:
            fix += ", or ZeRO-2 (a third of ZeRO-3's traffic) where it fits"
        out.append(
            Finding(
                "warn",
                f"communication-bound: >= {t.comm_s * 1e3:.0f} ms of collectives per step "
                f"({t.comm_bytes / 1e9:.2f} GB per rank at {t.link_gbs:g} GB/s) against "
                f"{t.compute_s * 1e3:.0f} ms of compute at MFU {c.mfu:g}",
                fix,
            )
        )
    d = plan.data
    if c.cores_per_node is not None:
        if d.cores_per_node_needed > c.cores_per_node:
            alt = ""
            if d.gpu_decode_possible:
                need = d.gpu_decode_cores_per_node
                alt = f"--set data.decode=device (workers then need {need:.1f} cores per node, GPUs decode)"
            out.append(
                Finding(
                    "error",
                    f"input needs {d.cores_per_node_needed:.0f} cores per node at "
                    f"{d.images_per_s_per_node:.0f} img/s, the node has {c.cores_per_node}",
                    alt or "fewer GPUs per node, cheaper views, or faster cores",
                )
            )
        else:
            out.append(
                Finding(
                    "ok", f"input needs {d.cores_per_node_needed:.1f} of {c.cores_per_node} cores per node"
                )
            )
    workers_node = c.ranks_per_node * max(1, cfg.data.num_workers)
    if d.cores_per_node_needed > workers_node:
        need = math.ceil(d.cores_per_node_needed / c.ranks_per_node)
        out.append(
            Finding(
                "warn",
                f"data.num_workers={cfg.data.num_workers} gives {workers_node} workers per "
                f"node for {d.cores_per_node_needed:.1f} cores of work",
                f"--set data.num_workers={need}",
            )
        )
    out += shard_findings(
        plan.dataset,
        world=c.gpus,
        gpus_per_node=c.ranks_per_node,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        epoch_size=cfg.data.epoch_size,
        global_batch=cfg.global_batch,
    )
    ck_plan = plan.checkpoint
    if ck_plan.ema_copies_bytes > 0.5 * ck_plan.total_bytes:
        out.append(
            Finding(
                "warn",
                f"{ck_plan.ema_copies_bytes / 1e9:.1f} GB of each checkpoint are the EMA "
                f"teacher's fp32 shadow, written by all {c.gpus} ranks under ZeRO-"
                f"{plan.chosen_stage}",
                "ZeRO-3 writes one partitioned copy",
            )
        )
    order = {"error": 0, "warn": 1, "ok": 2}
    return sorted(out, key=lambda f: order[f.level])


# ------------------------------------------------------------------------------------------------------------
# text


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}" if n < 10 * GIB else f"{n / GIB:.1f}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _header(plan: Plan) -> list[str]:
    c, b, cfg, n = plan.cluster, plan.batch, plan.cfg, plan.counts
    frozen = f" + {n.frozen / 1e6:.1f}M frozen" if n.frozen else ""
    model = cfg.model.get("model_name", "")
    return [
        f"{plan.recipe}: {cfg.method} {model}, {n.trainable / 1e6:.1f}M trained{frozen} parameters",
        f"cluster: {c.gpus} x {c.gpu.name} ({c.gpu.memory_gib:g} GiB, {c.gpu.peak_tflops:g} TFLOP/s) "
        f"on {c.nodes} node(s) of {c.ranks_per_node}; {plan.precision}; "
        f"DeepSpeed config {plan.ds_config} (ZeRO-{plan.chosen_stage})",
        f"batch: {b.global_batch} = micro {b.micro_batch} x accumulation {b.accumulation} x {b.world_size} "
        f"ranks; {plan.total_steps} steps ({plan.steps_per_epoch}/epoch, {cfg.optim.epochs:g} epochs)",
    ]


def _memory_table(plan: Plan) -> list[str]:
    c, b = plan.cluster, plan.batch
    usable = f"usable {_gib(plan.chosen.usable)} = {100 * (1 - c.margin):.0f}% of {c.gpu.memory_gib:g}"
    head = ("ZeRO", "ckpt", "params", "EMA", "grads", "optim", "buffers", "activ", "peak", "fits",
            "max micro", "DS estimate")
    widths = (-5, -5, 8, 7, 8, 8, 8, 8, 8, 6, 11, 13)

    def row(cells: tuple[str, ...]) -> str:
        return "  " + "".join(f"{x:<{-w}}" if w < 0 else f"{x:>{w}}" for x, w in zip(cells, widths))

    lines = [f"memory per rank, GiB (micro batch {b.micro_batch}; {usable})", row(head)]
    for (stage, ck), m in sorted(plan.memory.items()):
        s = m.states
        chosen = (stage, ck) == (plan.chosen_stage, plan.cfg.grad_checkpointing)
        transient = max(s.backward_transient, s.step_transient)
        cells = (str(stage), "on" if ck else "off", _gib(s.params), _gib(s.ema_shadow), _gib(s.gradients),
                 _gib(s.optimizer), _gib(transient), _gib(m.activations), _gib(m.peak),
                 "yes" if m.fits else "NO", str(m.max_micro_batch), _gib(s.deepspeed_estimate))
        lines.append(row(cells) + (" <" if chosen else ""))
    host = plan.chosen.states.host_per_rank
    if host:
        lines.append(f"  offloaded to host memory: {_gib(host)} GiB per rank, "
                     f"{_gib(host * c.ranks_per_node)} GiB per node")
    a = plan.activations
    lines.append(f"  activations measured per image: {a.per_image / 2**20:.1f} MiB, "
                 f"{a.per_image_checkpointed / 2**20:.1f} MiB checkpointed ({a.dtype}, depth {a.depth})")
    return lines


def _time_and_input(plan: Plan) -> list[str]:
    c, t, d = plan.cluster, plan.time, plan.data
    overlap = "overlapped" if t.overlap else "not overlapped"
    cores = f"{d.cores_per_node_needed:.1f} cores" + (f" of {c.cores_per_node}" if c.cores_per_node else "")
    if d.gpu_decode_possible:
        gpu = f"; with data.decode=device {d.gpu_decode_cores_per_node:.1f} cores + GPU decode"
    else:
        gpu = "; data.decode=device: single-view recipes only"
    return [
        f"time at MFU {c.mfu:g}: {t.train_flops_per_image / 1e9:.1f} GFLOPs/image ({t.flops_source}); "
        f"step: compute {_duration(t.compute_s)}, communication >= {_duration(t.comm_s)} "
        f"({t.comm_bytes / 1e9:.2f} GB at {t.link_gbs:g} GB/s, {overlap}) -> {_duration(t.step_s)}",
        f"  {t.images_per_s:,.0f} img/s, {t.days:.2f} days "
        f"({t.days_checkpointed:.2f} with activation checkpointing)",
        f"input per node: {d.images_per_s_per_node:,.0f} img/s, {d.mb_per_s_per_node:,.0f} MB/s of JPEGs "
        f"({plan.dataset.mean_jpeg_kb:.0f} kB), {d.views} view(s) at {d.host_ms_per_image:.2f} CPU-ms/img: "
        f"{cores}{gpu}",
    ]


def _checkpoint_and_data(plan: Plan) -> list[str]:
    k, ds = plan.checkpoint, plan.dataset
    shards = f", {ds.shards} shards" if ds.shards else ""
    return [
        f"checkpoint (ZeRO-{plan.chosen_stage}): {k.rank0_bytes / 1e9:.2f} GB rank 0, "
        f"{k.other_rank_bytes / 1e9:.2f} GB each other rank, {k.total_bytes / 1e9:.1f} GB in all; "
        f"{_duration(k.write_s)} at {k.write_gbs:g} GB/s; {k.saves} saves "
        f"(every {k.interval_steps} steps = {_duration(k.interval_steps * plan.time.step_s)})",
        f"data: {ds.images:,} images{shards} ({'; '.join(ds.sources)})",
    ]


def render(plan: Plan) -> str:
    """The plan as the text ``mimscale plan`` prints."""
    lines = [*_header(plan), "", *_memory_table(plan), "", *_time_and_input(plan)]
    lines += [*_checkpoint_and_data(plan), ""]
    for f in plan.findings:
        lines.append(f"{f.level.upper():<6}{f.what}" + (f"\n      -> {f.fix}" if f.fix else ""))
    lines += [f"NOTE  {note}" for note in plan.notes]
    return "\n".join(lines)
