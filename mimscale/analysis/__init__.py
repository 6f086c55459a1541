"""What a pretrained encoder learned: attention distance, singular-value spectra, attention maps and
reconstructions (``mimscale analyze``), on any timm ViT/BEiT encoder.

Python use::

    from mimscale.analysis import attention_distance, block_outputs, effective_rank, singular_value_spectrum

    dist = attention_distance(model, images)                 # [depth, heads], pixels
    tokens = block_outputs(model, images, layers="last")     # {block: [B, N, D]}
    spec = singular_value_spectrum(tokens[11][:, 1:])        # patch tokens only
    print(effective_rank(spec))
"""

from mimscale.analysis.attention import (
    attention_distance,
    attention_probs,
    cls_attention,
    mean_attention_distance,
    patch_distances,
)
from mimscale.analysis.hooks import block_outputs, visit_blocks
from mimscale.analysis.measure import EncoderMeasurements, measure_encoder
from mimscale.analysis.spectrum import effective_rank, normalised_singular_values, singular_value_spectrum

__all__ = [
    "EncoderMeasurements",
    "attention_distance",
    "attention_probs",
    "block_outputs",
    "cls_attention",
    "effective_rank",
    "mean_attention_distance",
    "measure_encoder",
    "normalised_singular_values",
    "patch_distances",
    "singular_value_spectrum",
    "visit_blocks",
]
