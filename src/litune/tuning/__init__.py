"""Hyper-parameter tuning: Lightning's learning-rate finder, a memory-bounded batch-size finder, Optuna sweeps.

Each tool drives ordinary ``litune fit`` runs (in-process for the learning-rate finder, as subprocesses for the
batch-size probes and sweep trials), so what is tuned is exactly what ``fit`` will run.
"""
