"""``litune prepare --config X.yaml [--data.init_args.x=y ...]``: tokenize the data once, into the cache ``fit`` reads.

It parses the same config files and overrides as ``litune fit`` (so the fingerprint is the one ``fit`` will compute),
builds only the data module, runs its ``prepare_data`` and prints what the data turned into.
"""

from __future__ import annotations

import sys
import time

from litune.errors import ConfigError, find_config_error


def format_stats(stats: dict, cache_hit: bool | None, seconds: float) -> str:
    """The human-readable summary ``litune prepare`` prints."""
    lines = [
        f"cache: {stats.get('cache_folder')} ({'reused' if cache_hit else 'built'} in {seconds:.1f} s)",
        f"samples: {stats.get('samples', 0):,}",
        f"tokens: {stats.get('tokens', 0):,}",
        f"truncated samples: {stats.get('truncated', 0):,}",
        f"rows without a target token dropped: {stats.get('untrainable_rows_dropped', 0):,}",
    ]
    if stats.get("bad_rows_skipped"):
        examples = "; ".join(stats.get("bad_row_examples", []))
        lines.append(f"bad rows skipped: {stats['bad_rows_skipped']:,} (e.g. {examples})")
    for split in ("train", "validation"):
        if split in stats:
            s = stats[split]
            lines.append(
                f"{split}: {s['rows']:,} rows, {s['row_tokens']:,} tokens, "
                f"packing efficiency {s['packing_efficiency']:.3f}, padding ratio {s['padding_ratio']:.3f}"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Prepare (or find) the tokenized data of a config and print its statistics.

    Args:
        argv: the same ``--config`` files and ``--data...`` overrides ``litune fit`` takes.

    Returns:
        0 on success (configuration errors propagate as :class:`ConfigError`; the CLI prints them and exits 2).
    """
    from litune.commands.fit import load_datamodule

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        datamodule = load_datamodule(argv)
    except ValueError as err:
        # jsonargparse wraps errors raised by a constructor in its own ValueError: surface our ConfigError.
        raise find_config_error(err) or err from None
    if not hasattr(datamodule, "prepare_data") or not hasattr(datamodule, "stats"):
        raise ConfigError("data", f"{type(datamodule).__name__} has nothing to prepare", "use a litune data module")
    start = time.perf_counter()
    datamodule.prepare_data()
    datamodule.setup("fit")
    elapsed = time.perf_counter() - start
    if getattr(datamodule, "spec", None) is not None and datamodule.spec.streaming:
        print("streaming data is tokenized on the fly: nothing to prepare", flush=True)
        return 0
    print(format_stats(datamodule.stats, datamodule.cache_hit, elapsed), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
