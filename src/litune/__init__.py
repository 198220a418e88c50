"""litune: distributed fine-tuning of Transformer language models on PyTorch Lightning."""

from litune.errors import ConfigError

__version__ = "0.1.0"

__all__ = ["ConfigError", "__version__"]
