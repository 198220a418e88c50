"""Run by tests/test_strategies.py: load a pretrained HF model under ZeRO-3 on 2 CPU ranks, built in configure_model.

Usage: python zero3_load_check.py PRETRAINED_DIR OUT_JSON. Lightning's launcher re-runs this script for rank 1. Rank 0
writes whether the parameters were partitioned at construction, how many elements rank 0 holds, and the largest
difference between the gathered parameters and the checkpoint's tensors.
"""

from __future__ import annotations

import json
import sys

import lightning as L
import torch
from safetensors.torch import load_file

from litune.models.hf import HFCausalLM
from litune.strategies import DeepSpeedStrategy
from litune.strategies.zero3 import is_partitioned


class Probe(L.LightningModule):
    def __init__(self, pretrained: str, out: str) -> None:
        super().__init__()
        self.pretrained, self.out, self.network = pretrained, out, None

    def configure_model(self) -> None:
        # Runs inside the strategy's deepspeed.zero.Init (+ transformers' ZeRO-3 loading): no rank holds the full model.
        if self.network is None:
            self.network = HFCausalLM(pretrained=self.pretrained)
            params = list(self.network.parameters())
            self.partitioned = all(is_partitioned(p) for p in params)
            self.local_numel = sum(p.ds_tensor.numel() if is_partitioned(p) else p.numel() for p in params)
            self.full_numel = sum(p.ds_numel if is_partitioned(p) else p.numel() for p in params)

    def training_step(self, batch, batch_idx):
        return self.network(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def on_fit_start(self) -> None:  # before any optimizer step changes the weights
        import deepspeed

        expected = load_file(f"{self.pretrained}/model.safetensors")
        diff = 0.0
        named = dict(self.network.model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(named.values())):
            if self.trainer.is_global_zero:
                for name, param in named.items():
                    if name in expected:
                        diff = max(diff, (param.detach().float() - expected[name].float()).abs().max().item())
        if self.trainer.is_global_zero:
            result = {"partitioned": self.partitioned, "local_numel": self.local_numel}
            result.update(full_numel=self.full_numel, max_abs_diff=diff)
            with open(self.out, "w") as f:
                json.dump(result, f)


if __name__ == "__main__":
    pretrained, out = sys.argv[1], sys.argv[2]
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 100, (4, 8))), batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DeepSpeedStrategy(stage=3), max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Probe(pretrained, out), data)
    # Tear the gloo group down before interpreter exit: left to process exit, its threads can abort the process.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
