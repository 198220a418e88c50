"""Networks: plain ``nn.Module`` s that share one interface (see ``docs/CONTRIBUTING.md``)."""

from litune.models.hf import HFCausalLM
from litune.models.output import IGNORE_INDEX, LMOutput, causal_lm_output

__all__ = ["HFCausalLM", "IGNORE_INDEX", "LMOutput", "causal_lm_output"]
