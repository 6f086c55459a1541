"""BEiT: BERT pre-training of image transformers (Bao et al. 2022; microsoft/unilm ``beit``), stage 2.

A frozen visual tokenizer (stage 1, or DALL-E's dVAE encoder; see ``mimscale.models.tokenizer``) turns the
*unmasked* crop into ids over its vocabulary (8192) on the ViT's patch grid. The ViT sees the same crop with
blockwise-masked patches (75 of 196, BEiT v1's ``MaskingGenerator``) replaced by a learnable mask token;
a linear softmax classifier on its final-normed outputs predicts the ids of the masked positions, and the
loss is the cross-entropy over exactly those positions, averaged over all masked positions of the batch
(official ``engine_for_pretraining.py``: ``CrossEntropyLoss()(model(x, mask)[mask], ids[mask])``).

Backbone: timm's BEiT architecture as in BEiT pre-training (``modeling_pretrain.py``): no absolute
position table, one relative position bias shared by all blocks, layer scale (0.1 for base, 1e-5 for
large), and the final LayerNorm over every token (``use_fc_norm=False`` in timm, whose default moves it
behind average pooling). Initialisation follows the official model: truncated normal with std 0.02
*truncated at +-std* (``a=-std, b=std``) for every Linear, the patch-embedding conv, CLS and mask tokens
and the classifier, then the per-layer ``1 / sqrt(2 * layer_id)`` rescale of each block's output
projections.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.masking import BlockwiseMasker
from mimscale.methods.base import Method, MethodOutput, register_method
from mimscale.models.backbones import beit_style_kwargs
from mimscale.models.encoder import MaskedEncoder
from mimscale.models.heads import init_beit_style_, trunc_normal_within_std_
from mimscale.models.tokenizer import VisualTokenizer, load_tokenizer, random_tokenizer, to_unit_range

INIT_STD = 0.02
PAPER_GRID_CELLS, PAPER_NUM_MASKED = 196, 75  # --num_mask_patches 75 on the 14x14 grid
MASK_RATIO = 0.4
# run_beit_pretraining.py get_model(): the BEiT-style layout (models.backbones.BEIT_STYLE: shared rel-pos
# bias, no absolute table) with layer scale 0.1, drop path 0.1 and the final norm on every token.
BEIT_PRETRAIN_TIMM = {"init_values": 0.1, "drop_path_rate": 0.1, "use_fc_norm": False}


def default_num_masked(num_patches: int) -> int:
    """75 on the paper's 14x14 grid (the official ``--num_mask_patches``), ``round(0.4 * L)`` on others."""
    return PAPER_NUM_MASKED if num_patches == PAPER_GRID_CELLS else max(1, round(MASK_RATIO * num_patches))


def mim_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BEiT's loss: mean cross-entropy over the masked positions of the whole batch.

    ``logits`` ``[B, L, V]`` (all positions; only masked ones contribute, so unmasked logits get zero
    gradient), ``ids`` ``[B, L]`` the tokenizer's ids of the unmasked image, ``mask`` ``[B, L]`` bool.
    """
    return F.cross_entropy(logits[mask].float(), ids[mask])


@register_method
class BEiT(Method):
    """BEiT masked image modeling against a frozen tokenizer's ids.

    Args:
        model_name: timm BEiT architecture (``beit_base_patch16_224``, ``beit_large_patch16_224``).
        tokenizer_path: the frozen tokenizer: a ``mimscale export`` of a ``beit_tokenizer`` run, or
            DALL-E's ``encoder.pkl`` / its state dict (:func:`~mimscale.models.tokenizer.load_tokenizer`).
            ``"random"`` builds a random frozen tokenizer with a loud warning (smoke runs only). Required.
        num_masked: masked patches per image (None: 75 on 14x14, ``round(0.4 * L)`` otherwise).
        min_block, max_block, min_aspect: blockwise masking (16, None, 0.3).
        mask_exact: False = BEiT v1 (may stop a little short of ``num_masked``); True = v2's exact count.
        logits_on_all_tokens: run the classifier on every position and select masked ones in the loss
            (for analysis and tests). The default classifies only masked positions, as the official
            ``return_all_tokens=False``; both give the same loss.
        timm_kwargs: the encoder's timm arguments; BEiT pre-training's (shared relative position bias, no
            absolute table, layer scale 0.1, drop path 0.1, final norm on all tokens) are the defaults.
    """

    name = "beit"
    default_model_name = "beit_base_patch16_224"
    # --smoke without --set model.tokenizer_path: a random frozen tokenizer, announced loudly (the path
    # given with --set still wins: overrides apply after the smoke defaults).
    smoke_kwargs = {"tokenizer_path": "random"}

    def __init__(self, model_name: str = "beit_base_patch16_224", *, tokenizer_path: str | None = None,
                 num_masked: int | None = None, min_block: float = 16, max_block: float | None = None,
                 min_aspect: float = 0.3, mask_exact: bool = False, logits_on_all_tokens: bool = False,
                 **timm_kwargs: Any) -> None:
        super().__init__()
        timm_kwargs = beit_style_kwargs(model_name, BEIT_PRETRAIN_TIMM, timm_kwargs)
        self.encoder = MaskedEncoder(model_name, **timm_kwargs)
        if not self.encoder.is_beit:
            raise ValueError(f"model_name={model_name!r}: BEiT pre-training needs a timm BEiT architecture "
                             "(e.g. beit_base_patch16_224)")
        self.tokenizer = self._build_tokenizer(tokenizer_path)
        n = num_masked if num_masked is not None else default_num_masked(self.encoder.num_patches)
        self.masker = BlockwiseMasker(self.encoder.grid, n, min_block=min(min_block, n), max_block=max_block,
                                      min_aspect=min_aspect, exact=mask_exact)
        dim = self.encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder.use_external(self.mask_token)
        self.head = nn.Linear(dim, self.tokenizer.vocab_size)
        self.logits_on_all_tokens = logits_on_all_tokens
        self._init_weights()

    def _build_tokenizer(self, path: str | None) -> VisualTokenizer:
        if not path:
            raise ValueError("BEiT needs a frozen tokenizer: set model.tokenizer_path (e.g. --set "
                             "model.tokenizer_path=tokenizer.safetensors, a `mimscale export` of a "
                             "recipes/beit_tokenizer.py run, or DALL-E's encoder.pkl)")
        grid = self.encoder.grid
        if path == "random":
            warnings.warn("BEiT tokenizer_path='random': training against a RANDOMLY INITIALISED tokenizer. "
                          "Its ids mean nothing; use it for smoke tests only.", stacklevel=3)
            print("[mimscale] WARNING model.tokenizer_path=random: BEiT targets come from a random, "
                  "untrained tokenizer (smoke test only)", flush=True)
            return random_tokenizer(grid, stride=max(1, self.encoder.patch_size // 2))
        tok = load_tokenizer(path)
        size = (grid[0] * tok.stride, grid[1] * tok.stride)
        if size[0] != tok.config.input_size:
            warnings.warn(f"tokenizer {path} was trained at {tok.config.input_size} px; BEiT's "
                          f"{grid[0]}x{grid[1]} grid feeds it {size[0]}x{size[1]} px (stride {tok.stride})",
                          stacklevel=3)
        return tok

    def _init_weights(self) -> None:
        """Official ``VisionTransformerForMaskedImageModeling.__init__`` init (see module docstring)."""
        with torch.no_grad():
            init_beit_style_(self.encoder.backbone, INIT_STD)  # linears, norms, CLS, fix_init_weight
            trunc_normal_within_std_(self.mask_token, INIT_STD)
            trunc_normal_within_std_(self.head.weight, INIT_STD)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """The official ``no_weight_decay()``: ``pos_embed`` and ``cls_token`` (beyond 1-D tensors)."""
        names = {"encoder.backbone.cls_token"}
        if getattr(self.encoder.backbone, "pos_embed", None) is not None:
            names.add("encoder.backbone.pos_embed")
        return names

    def forward(self, images: torch.Tensor | list[torch.Tensor],
                mask: torch.Tensor | None = None) -> MethodOutput:
        """``images``: normalised crops ``[B, C, H, W]`` (or a one-view list). Returns the loss over masked
        positions; ``pred`` is ``[N_masked, V]`` logits in ``mask``'s row-major order (``[B, L, V]`` with
        ``logits_on_all_tokens``), ``target`` the ids ``[B, L]``, ``mask`` ``[B, L]``."""
        if isinstance(images, (list, tuple)):
            images = images[0]
        batch = images.shape[0]
        if mask is None:
            mask = self.masker(batch, device=images.device)
        if mask.shape != (batch, self.encoder.num_patches):
            raise ValueError(f"mask shape {tuple(mask.shape)} != (batch, num_patches) = "
                             f"{(batch, self.encoder.num_patches)}")
        mask = mask.to(device=images.device, dtype=torch.bool)
        with torch.no_grad():
            ids = self.tokenizer(to_unit_range(images), self.encoder.grid)  # [B, L], the unmasked image
        tokens, _ = self.encoder(images, mask=mask, mask_token=self.mask_token)
        hidden = tokens[:, 1:]
        if self.logits_on_all_tokens:
            logits = self.head(hidden)
            loss = mim_cross_entropy(logits, ids, mask)
            masked_logits = logits[mask]
        else:
            masked_logits = logits = self.head(hidden[mask])
            loss = F.cross_entropy(logits.float(), ids[mask])
        with torch.no_grad():
            acc = (masked_logits.argmax(dim=-1) == ids[mask]).float().mean()
        metrics = {"loss_mim": loss.detach(), "mlm_acc": acc}
        return MethodOutput(loss=loss, metrics=metrics, pred=logits, target=ids, mask=mask)
