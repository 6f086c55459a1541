"""Imports every method module so their ``@register_method`` decorators run."""

from mimscale.methods import beit, beit_tokenizer, data2vec, ibot, lut, mae, simmim  # noqa: F401
