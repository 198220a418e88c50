"""What runs record about themselves, apart from the callbacks and loggers that do the recording.

- :mod:`~litune.tracking.secrets`: scrub API keys and tokens from anything saved or logged (used by
  :mod:`litune.loggers` and :mod:`litune.callbacks.run_info`);
- :mod:`~litune.tracking.peaks`: the dense peak FLOP/s table, the denominator of MFU
  (used by :mod:`litune.callbacks.throughput`).

Plain functions and tables: nothing here imports Lightning.
"""
