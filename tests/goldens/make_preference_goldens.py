"""Write ``preference_losses.json``: float64 preference-loss values and gradients computed by TRL's own loss code.

TRL's losses are methods of its Trainers. TRL 0.19.1 is the last release where each is a standalone method
(``DPOTrainer.dpo_loss``, ``CPOTrainer.cpo_loss``, ``ORPOTrainer.odds_ratio_loss``, ``KTOTrainer.kto_loss``; later
releases inline DPO's into ``_compute_loss``), but its modules no longer import under transformers 5. So this script
reads those methods' source from the TRL 0.19.1 files verbatim (``ast``) and runs them with a stand-in ``self`` that
holds the settings. Run it with TRL 0.19.1 unpacked somewhere (no install needed, nothing of it is imported):

    pip install --no-deps --target /tmp/trl019 trl==0.19.1
    python tests/goldens/make_preference_goldens.py /tmp/trl019/trl > tests/goldens/preference_losses.json
"""

from __future__ import annotations

import ast
import enum
import hashlib
import json
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

BETA, LABEL_SMOOTHING, GAMMA = 0.3, 0.15, 0.7
# Summed response log-probs of 6 pairs, incl. equal policy/reference, large margins and extreme values.
CHOSEN = [-12.5, -3.0, -40.0, -0.5, -1500.0, -7.25]
REJECTED = [-14.0, -2.5, -90.0, -0.25, -1.0, -7.25]
REF_CHOSEN = [-13.0, -3.0, -35.0, -0.75, -1400.0, -7.25]
REF_REJECTED = [-13.5, -2.0, -60.0, -0.5, -3.0, -7.25]
CHOSEN_TOKENS = [5, 3, 20, 2, 600, 4]
REJECTED_TOKENS = [6, 2, 30, 1, 2, 4]
KTO_DESIRABLE = [True, False, True, True, False, False]
KTO_POLICY_KL, KTO_REF_KL = [-10.0, -5.0, -8.0], [-10.5, -5.5, -7.75]


class FDivergenceType(enum.Enum):  # what dpo_loss compares self.f_divergence_type with
    REVERSE_KL = "reverse_kl"
    JS_DIVERGENCE = "js_divergence"
    ALPHA_DIVERGENCE = "alpha_divergence"


def trl_method(trl_root: Path, module: str, cls: str, name: str):
    """The function ``cls.name`` of ``trl/trainer/<module>.py``, compiled from TRL's own source text."""
    source = (trl_root / "trainer" / f"{module}.py").read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    code = textwrap.dedent(ast.get_source_segment(source, item))
                    namespace = {"torch": torch, "F": F, "FDivergenceType": FDivergenceType, "Union": object,
                                 "Optional": object}  # fmt: skip
                    exec(compile("from __future__ import annotations\n" + code, f"trl/{module}.py", "exec"), namespace)
                    return namespace[name], hashlib.sha256(code.encode()).hexdigest()[:16]
    raise LookupError(f"{cls}.{name} not in {module}")


def leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def case(fn, inputs: dict[str, list]) -> dict:
    """Losses of ``fn(**leaves)``, its mean and the gradients of the mean w.r.t. every input."""
    leaves = {k: leaf(v) for k, v in inputs.items()}
    losses = fn(**leaves)
    losses.mean().backward()
    return {
        "inputs": inputs,
        "losses": losses.tolist(),
        "mean": losses.mean().item(),
        "grads": {k: (v.grad if v.grad is not None else torch.zeros_like(v)).tolist() for k, v in leaves.items()},
    }


def main(trl_root: Path) -> dict:
    lines = (trl_root / "__init__.py").read_text().splitlines()
    version = next(line.split("=")[1].strip().strip("\"'") for line in lines if line.startswith("__version__"))
    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t)
    dpo_loss, dpo_hash = trl_method(trl_root, "dpo_trainer", "DPOTrainer", "dpo_loss")
    cpo_loss, cpo_hash = trl_method(trl_root, "cpo_trainer", "CPOTrainer", "cpo_loss")
    orpo_loss, orpo_hash = trl_method(trl_root, "orpo_trainer", "ORPOTrainer", "odds_ratio_loss")
    kto_loss, kto_hash = trl_method(trl_root, "kto_trainer", "KTOTrainer", "kto_loss")

    def dpo_self(loss_type: str, label_smoothing: float = 0.0) -> SimpleNamespace:
        return SimpleNamespace(beta=BETA, label_smoothing=label_smoothing, loss_type=loss_type, reference_free=False,
                               f_divergence_type="reverse_kl", f_divergence_params=None, use_weighting=False,
                               accelerator=accelerator)  # fmt: skip

    paired = {"chosen_logps": CHOSEN, "rejected_logps": REJECTED, "ref_chosen_logps": REF_CHOSEN,
              "ref_rejected_logps": REF_REJECTED}  # fmt: skip
    ct, rt = torch.tensor(CHOSEN_TOKENS, dtype=torch.float64), torch.tensor(REJECTED_TOKENS, dtype=torch.float64)
    cases = {}
    for name, loss_type, smoothing in (("sigmoid", "sigmoid", 0.0), ("sigmoid_smoothed", "sigmoid", LABEL_SMOOTHING),
                                       ("hinge", "hinge", 0.0)):  # fmt: skip
        settings = dpo_self(loss_type, smoothing)
        cases[name] = case(lambda _s=settings, **kw: dpo_loss(_s, **kw)[0], paired)

    # IPO: TRL's concatenated_forward divides policy and reference log-probs by the response length.
    def ipo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
        return dpo_loss(dpo_self("ipo"), chosen_logps / ct, rejected_logps / rt, ref_chosen_logps / ct,
                        ref_rejected_logps / rt)[0]  # fmt: skip

    cases["ipo"] = case(ipo, paired)
    unref = {"chosen_logps": CHOSEN, "rejected_logps": REJECTED}
    for name, smoothing in (("simpo", 0.0), ("simpo_smoothed", LABEL_SMOOTHING)):
        cpo_self = SimpleNamespace(beta=BETA, simpo_gamma=GAMMA, label_smoothing=smoothing, loss_type="simpo",
                                   accelerator=accelerator)  # fmt: skip
        # CPOTrainer averages log-probs over the response for simpo (average_log_prob=True).
        cases[name] = case(lambda chosen_logps, rejected_logps, _s=cpo_self: cpo_loss(_s, chosen_logps / ct,
                           rejected_logps / rt)[0], unref)  # fmt: skip
    orpo_self = SimpleNamespace(beta=BETA, accelerator=accelerator)
    # ORPOTrainer averages log-probs (average_log_prob=True); its loss is nll - mean(losses): litune's term is -losses.
    cases["orpo"] = case(lambda chosen_logps, rejected_logps: -orpo_loss(orpo_self, chosen_logps / ct,
                         rejected_logps / rt)[0], unref)  # fmt: skip
    kto_self = SimpleNamespace(beta=BETA, calculate_KL=True, loss_type="kto", desirable_weight=1.3,
                               undesirable_weight=0.7, accelerator=accelerator)  # fmt: skip
    desirable = torch.tensor(KTO_DESIRABLE)

    def kto(logps, ref_logps, policy_kl_logps, ref_kl_logps):
        # kto_loss returns desirable losses first, then undesirable: litune keeps the examples' order.
        losses = kto_loss(kto_self, logps[desirable], logps[~desirable], policy_kl_logps, ref_logps[desirable],
                          ref_logps[~desirable], ref_kl_logps)[0]  # fmt: skip
        order = torch.cat([torch.nonzero(desirable).flatten(), torch.nonzero(~desirable).flatten()])
        return torch.empty_like(losses).index_copy(0, order, losses)

    cases["kto"] = case(kto, {"logps": CHOSEN, "ref_logps": REF_CHOSEN, "policy_kl_logps": KTO_POLICY_KL,
                              "ref_kl_logps": KTO_REF_KL})  # fmt: skip
    cases["kto"]["desirable"] = KTO_DESIRABLE
    cases["kto"]["weights"] = [1.3, 0.7]
    return {
        "provenance": {
            "trl": version,
            "functions": {
                "DPOTrainer.dpo_loss": dpo_hash,
                "CPOTrainer.cpo_loss": cpo_hash,
                "ORPOTrainer.odds_ratio_loss": orpo_hash,
                "KTOTrainer.kto_loss": kto_hash,
            },  # fmt: skip
            "torch": torch.__version__,
            "dtype": "float64",
            "made_by": "tests/goldens/make_preference_goldens.py",
        },
        "settings": {"beta": BETA, "label_smoothing": LABEL_SMOOTHING, "gamma": GAMMA},
        "tokens": {"chosen": CHOSEN_TOKENS, "rejected": REJECTED_TOKENS},
        "cases": cases,
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
