"""Pretraining methods: each maps a batch of images to a :class:`MethodOutput`.

Every module of this package is imported here, so each method's ``@register_method`` runs and
``create_method(name)`` finds it (timm's ``models/__init__.py`` imports its model families the same way, by
name; here the package is scanned, so a new method is one new module and nothing else).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from mimscale.methods.base import (
    Method,
    MethodOutput,
    create_method,
    get_method_class,
    list_methods,
    register_method,
)
from mimscale.methods.teacher import EMATeacherMixin, MissingTeacherStateError

for _module in _pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "EMATeacherMixin",
    "Method",
    "MethodOutput",
    "MissingTeacherStateError",
    "create_method",
    "get_method_class",
    "list_methods",
    "register_method",
]
