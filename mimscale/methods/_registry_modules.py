"""Imports every method module so their ``@register_method`` decorators run."""

from mimscale.methods import mae  # noqa: F401
