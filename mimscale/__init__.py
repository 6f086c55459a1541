"""mimscale: masked-image-modeling pretraining for Vision Transformers on DeepSpeed."""

from mimscale.methods.base import create_method, list_methods

__version__ = "0.1.0"
__all__ = ["create_method", "list_methods", "__version__"]
