"""The BEiT-style backbone the BEiT-family papers pretrain (BEiT, SimMIM's ViT runs, data2vec vision), as
timm ``Beit`` keyword arguments: one definition, which each method completes with its own paper's values.

All three official codebases derive from BEiT's ``modeling_pretrain.py``: no absolute position table, one
relative position bias shared by every block, and layer scale. They differ in the layer-scale value, the
stochastic depth and where the final LayerNorm sits, which each method states next to its citation.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# run_beit_pretraining.py / SimMIM config.py (USE_APE False, USE_RPB False, USE_SHARED_RPB True) /
# data2vec run_cyclical.py (rel_pos_bias shared by default): the relative-position layout they share.
BEIT_STYLE: dict[str, Any] = {
    "use_abs_pos_emb": False,
    "use_rel_pos_bias": False,
    "use_shared_rel_pos_bias": True,
}


def beit_style_kwargs(
    model_name: str, method_defaults: dict[str, Any], user: dict[str, Any]
) -> dict[str, Any]:
    """timm kwargs for a method's encoder: for a ``beit_*`` architecture :data:`BEIT_STYLE` plus the method's
    own defaults, under whatever the user (recipe, ``--set``) gave. A ViT architecture gets only
    ``global_pool="token"`` (timm's default there, which keeps the final norm on the tokens)."""
    base = {**BEIT_STYLE, **method_defaults} if model_name.startswith("beit") else {"global_pool": "token"}
    return {**base, **user}


def check_final_norm(encoder: Any) -> None:
    """SimMIM and data2vec read final-normed tokens; timm drops that norm when pooling with ``avg``."""
    if isinstance(encoder.backbone.norm, nn.Identity):
        raise ValueError(
            "this method needs the encoder's final LayerNorm on the tokens, but the timm model "
            "was built with it moved after pooling (global_pool='avg' / use_fc_norm=True); "
            "use global_pool='token'"
        )
