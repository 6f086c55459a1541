"""Model building blocks shared by the methods: the masked timm encoder, decoders and position tables."""

from mimscale.models.encoder import MaskedEncoder
from mimscale.models.pos_embed import sincos_pos_embed_2d

__all__ = ["MaskedEncoder", "sincos_pos_embed_2d"]
