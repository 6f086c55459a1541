"""Pretraining methods: each maps a batch of images to a :class:`MethodOutput`."""

from mimscale.methods.base import (
    Method,
    MethodOutput,
    create_method,
    get_method_class,
    list_methods,
    register_method,
)

__all__ = ["Method", "MethodOutput", "create_method", "get_method_class", "list_methods", "register_method"]
