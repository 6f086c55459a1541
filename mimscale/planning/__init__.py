"""Plan a run before renting the cluster (``mimscale plan``): per-rank memory under each ZeRO stage, step time
and days at an assumed MFU, the input rate and CPU cores per node, checkpoint sizes, and the shard layout.

One concept per module: :mod:`~mimscale.planning.recipe` (which run), :mod:`~mimscale.planning.memory`
(model states per ZeRO stage, fit), :mod:`~mimscale.planning.activations` (measured activation bytes),
:mod:`~mimscale.planning.time` (step time), :mod:`~mimscale.planning.data` (input rate),
:mod:`~mimscale.planning.shards` (data set and shard layout), :mod:`~mimscale.planning.checkpoint`,
:mod:`~mimscale.planning.presets` (every assumed number), :mod:`~mimscale.planning.report` (the whole plan:
``make_plan``, ``render``), :mod:`~mimscale.planning.cli`. Error bars and worked examples:
``docs/planning.md``.

Unlike the rest of the library, this package builds on :mod:`mimscale.train` (the batch plan, the config and
the DeepSpeed config handling are the trainer's own), as the trainer does. Nothing is imported here, so that
``mimscale --help`` stays fast.
"""
