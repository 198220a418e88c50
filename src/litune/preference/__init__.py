"""Preference tuning: DPO, IPO, hinge, SimPO, ORPO and KTO objectives, their data, reference models and reward models.

* :mod:`litune.preference.losses`: the losses on per-sequence log-probs (golden-tested against TRL);
* :mod:`litune.preference.logps`: per-token / per-sequence log-probs chunk by chunk through the output layer;
* :mod:`litune.preference.reference`: frozen copy, adapters-disabled base, weights fingerprint;
* :mod:`litune.preference.objective`: ``model.preference``, the exact step objective of :class:`~litune.module.LitLM`;
* :mod:`litune.preference.data`: ``PreferenceDataModule`` (pairs, chat messages, KTO examples; cached; truncation).
"""

from litune.preference.objective import Preference

__all__ = ["Preference"]
