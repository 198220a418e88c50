"""Remove secrets (API keys, access tokens, passwords) from anything that is saved or logged.

Two nets, because either alone leaks:

* by field name: a value under a name such as ``api_key``, ``hf_token``, ``wandb_secret`` or ``password`` is replaced;
* by value: the values of secret-looking environment variables (``WANDB_API_KEY``, ``HF_TOKEN``, ...) are replaced
  wherever they appear inside any string, e.g. pasted into a URL or a free-form field.

Names are split into words so that ``tokenizer``, ``max_tokens`` or ``pad_token_id`` are not mistaken for secrets,
and the tokenizer's special tokens (``eos_token: "<|endoftext|>"``) are kept.
"""

from __future__ import annotations

import os
import re
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"

_SECRET_WORDS = {"secret", "secrets", "password", "passwd", "apikey", "credential", "credentials", "auth"}
_SECRET_LAST_WORDS = {"key", "token"}
_SPECIAL_TOKENS = {"bos", "eos", "pad", "unk", "sep", "cls", "mask", "special", "start", "end", "decoder", "prompt"}
_MIN_SECRET_LEN = 6  # shorter env values ("1", "true") would redact half the config by accident


def _words(name: str) -> list[str]:
    """``"wandbApiKey"`` / ``"WANDB_API_KEY"`` / ``"hf-token"`` -> lowercase words."""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [w for w in re.split(r"[^a-zA-Z0-9]+", name.lower()) if w]


def is_secret_name(name: str) -> bool:
    """Whether a field or environment variable name says its value is a secret.

    Examples: ``api_key``, ``WANDB_API_KEY``, ``hf_token``, ``access_token``, ``db_password``, ``client_secret`` are;
    ``tokenizer``, ``pad_token_id``, ``eos_token``, ``max_tokens``, ``monkey`` are not.
    """
    words = _words(name)
    if not words:
        return False
    if _SECRET_WORDS.intersection(words):
        return True
    if words[-1] in _SECRET_LAST_WORDS:
        return not (words[-1] == "token" and len(words) > 1 and words[-2] in _SPECIAL_TOKENS)
    return False


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of secret-named environment variables, longest first (so that a secret containing another is
    replaced whole)."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def scrub(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of ``obj`` (nested dicts, lists, tuples, strings, scalars) with secrets replaced by ``<redacted>``.

    Args:
        obj: the config or metadata to clean (namespaces become dicts). Other objects are returned as they are.
        secrets: literal values to remove from every string; default: :func:`secret_env_values`.
    """
    secrets = secret_env_values() if secrets is None else secrets
    if isinstance(obj, Namespace):  # argparse's, or jsonargparse's nested one (which has as_dict)
        obj = obj.as_dict() if hasattr(obj, "as_dict") else vars(obj)
    if isinstance(obj, Mapping):
        return {
            k: (REDACTED if v not in (None, "") and is_secret_name(str(k)) else scrub(v, secrets))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        # A command line ["--hf_token", "hf_..."]: the value after a secret-named flag is a secret too.
        after_flag = [i > 0 and _is_secret_flag(obj[i - 1]) for i in range(len(obj))]
        return type(obj)(REDACTED if flagged else scrub(v, secrets) for v, flagged in zip(obj, after_flag, strict=True))
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, REDACTED)
        # "--trainer.logger.init_args.api_key=abc" on a command line, "?token=abc" in a URL
        return _ASSIGNMENT.sub(lambda m: f"{m[1]}={REDACTED}" if is_secret_name(_last_name(m[1])) else m[0], obj)
    return obj


_ASSIGNMENT = re.compile(r"([A-Za-z0-9_.\-]+)=([^\s&]+)")


def _last_name(dotted: str) -> str:
    return dotted.lstrip("-").rsplit(".", 1)[-1]


def _is_secret_flag(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("--") and "=" not in value and is_secret_name(_last_name(value))
