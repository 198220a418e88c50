"""litune: distributed fine-tuning of Transformer language models on PyTorch Lightning."""

import logging

from litune.errors import ConfigError

__version__ = "0.1.0"

__all__ = ["ConfigError", "__version__"]

# transformers imports bitsandbytes (installed for QLoRA) whenever it loads a model, and bitsandbytes then warns on
# every CPU run that an optional kernel could not be fetched from a hub. litune's 4-bit path works without it, so the
# warning says nothing a user must act on; errors from that module still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
