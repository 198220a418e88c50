"""Networks: plain ``nn.Module`` s that share one interface (see ``docs/CONTRIBUTING.md``)."""

from litune.versions import check_versions

# Everything that computes (networks, LitLM, data, which needs IGNORE_INDEX) imports this package first: refuse older
# dependency versions here, before a number is computed with them.
check_versions()

from litune.models.hf import DeferredHFCausalLM, HFCausalLM  # noqa: E402
from litune.models.output import IGNORE_INDEX, LMOutput, causal_lm_output  # noqa: E402

__all__ = ["DeferredHFCausalLM", "HFCausalLM", "IGNORE_INDEX", "LMOutput", "causal_lm_output"]
