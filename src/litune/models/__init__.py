"""Networks: plain ``nn.Module`` s that share one interface (see ``docs/CONTRIBUTING.md``)."""

from litune.models.hf import DeferredHFCausalLM, HFCausalLM
from litune.models.output import IGNORE_INDEX, LMOutput, causal_lm_output

__all__ = ["DeferredHFCausalLM", "HFCausalLM", "IGNORE_INDEX", "LMOutput", "causal_lm_output"]
