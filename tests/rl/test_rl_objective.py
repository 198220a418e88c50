"""GRPO inside the training loop (``model.rl``): REINFORCE at one iteration, exactness, the quickstart, bad configs.

Real tiny networks (litune's decoder) generate real rollouts with litune's generation and train through the real
Trainer; the rewards are litune's built-ins. Nothing is mocked.
"""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from litune.cli import main
from litune.models.transformer import DecoderLM
from litune.module import LitLM
from litune.preference.logps import token_logps
from litune.rl.data import PromptDataModule
from litune.rl.losses import GRPOLoss, group_advantages, grpo_token_losses, policy_loss_terms
from litune.rl.objective import RL, GRPOObjective
from litune.rl.rewards import RewardSpec

REPO = Path(__file__).resolve().parents[2]
VOCAB = 512  # the tokenizer_dir fixture's
LR = 0.5


# ---------------------------------------------------------------------------------------------- the math, float64
@pytest.mark.parametrize("normalization", ["sequence", "token", "constant"])
def test_one_iteration_without_clipping_is_reinforce_with_group_baselines(normalization: str) -> None:
    """Ratio 1 (old log-probs = the detached current ones): the loss gradient is, hand-derived on the logits,
    ``d/d theta_itv = -A_i / W * m_it * (onehot(y_it)_v - softmax(theta_it)_v)`` with ``W`` the normalization's
    weight (times ``|o_i|`` per completion for ``sequence``)."""
    g = torch.Generator().manual_seed(0)
    p, group, t, v = 2, 3, 5, 7
    n = p * group
    theta = torch.randn(n, t, v, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n, t), generator=g)
    lengths = torch.tensor([5, 2, 4, 1, 3, 5])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.9, 0.2], dtype=torch.float64)
    advantages = group_advantages(rewards, group)
    logps = torch.log_softmax(theta, -1).gather(-1, targets[..., None]).squeeze(-1)
    losses, clipped = grpo_token_losses(logps, logps.detach(), advantages, GRPOLoss(normalization=normalization))
    numerator, weight = policy_loss_terms(losses, mask, normalization, max_completion_length=t)
    (numerator / weight).backward()

    assert not clipped.any()
    per_token = {"sequence": n * lengths.double(), "token": lengths.sum().double().expand(n),
                 "constant": torch.full((n,), float(n * t), dtype=torch.float64)}[normalization]  # fmt: skip
    onehot = torch.nn.functional.one_hot(targets, v).double()
    expected = -(advantages / per_token)[:, None, None] * mask[..., None] * (onehot - torch.softmax(theta, -1))
    torch.testing.assert_close(theta.grad, expected.detach(), rtol=1e-12, atol=1e-14)
    # Group baselines: each group's advantages sum to 0, so a reward shift common to a group changes nothing.
    torch.testing.assert_close(group_advantages(rewards + torch.tensor([3.0] * 3 + [-1.0] * 3).double(), group),
                               advantages)  # fmt: skip


# ---------------------------------------------------------------------------------------------- through the Trainer
def prompt_rows(n: int) -> list[dict]:
    words = ["def", "class", "return", "import", "for", "while", "with", "yield"]
    return [{"prompt": " ".join(words[(i * k) % len(words)] for k in range(1, 2 + i % 4)), "answer": str(i)}
            for i in range(n)]  # fmt: skip


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(16)))
    return path


def rl_config(**overrides) -> RL:
    settings = {"rewards": [RewardSpec("litune.rl.rewards:char_fraction", kwargs={"chars": "aeiou"})],
                "num_generations": 4, "max_completion_length": 6, "logps_chunk_size": 16, **overrides}  # fmt: skip
    return RL(**settings)


def system(tokenizer_dir: Path, rl: RL, eos_prone: bool = False) -> LitLM:
    """A seeded tiny decoder; ``eos_prone``: EOS gets ~20% of every next-token distribution (the final norm's bias
    points along EOS's tied embedding), so completions end at uneven lengths."""
    torch.manual_seed(0)
    network = DecoderLM(d_model=16, nhead=2, num_decoder_layers=1, vocab_size=VOCAB, max_seq_len=64, dropout=0.0)
    module = LitLM(network, tokenizer=str(tokenizer_dir), optimizer=partial(torch.optim.SGD, lr=LR), rl=rl)
    if eos_prone:
        with torch.no_grad():
            network.ln_f.bias.fill_(0.5)
            network.wte.weight[module.tokenizer.eos_token_id] = 0.6  # EOS logit 16 x 0.5 x 0.6 = 4.8
    return module


def data(tokenizer_dir: Path, prompts_file: Path, cache: Path, batch_size: int) -> PromptDataModule:
    return PromptDataModule(str(tokenizer_dir), str(prompts_file), batch_size=batch_size, val_fraction=0.0,
                            shuffle=False, cache_dir=str(cache))  # fmt: skip


def fit(module: LitLM, dm: PromptDataModule, accumulate: int, steps: int) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, accumulate_grad_batches=accumulate, logger=False,
                        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, dm)
    return trainer


def params(module: LitLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.network.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_a_step_is_the_hand_reinforce_update_and_exact_across_accumulation(tokenizer_dir, prompts_file, tmp_path):
    """One optimizer step of 4 prompts x 4 completions (token normalization: the divisor is only known once all
    the step's completions exist): micro-batches of 4, 2 x 2 and 1 x 4 move the weights the same, and the update is
    ``-lr`` times the gradient of the hand-written REINFORCE objective on the same (re-generated) rollouts."""
    rl = rl_config(normalization="token")
    trained = {}
    for micro in (4, 2, 1):
        module = system(tokenizer_dir, rl, eos_prone=True)
        fit(module, data(tokenizer_dir, prompts_file, tmp_path, micro), 4 // micro, steps=1)
        trained[micro] = params(module)
    # By hand: the same prompts, the same per-prompt seeds (step 0), REINFORCE with group baselines.
    module = system(tokenizer_dir, rl, eos_prone=True)
    initial = params(module)
    objective = GRPOObjective(rl, module.network, False)
    objective.tokenizer = module.tokenizer
    batch = next(iter(data(tokenizer_dir, prompts_file, tmp_path, 4).train_dataloader()))
    rollouts = objective.rollouts(module.network, batch, step=0)
    logps, mask = token_logps(module.network, rollouts.inputs, None)
    assert rollouts.advantages.abs().sum() > 0, "the rollouts' rewards differ within a group"
    assert len(set(rollouts.lengths.tolist())) > 2, "completions of uneven lengths"
    loss = -(rollouts.advantages[:, None] * logps * mask).sum() / mask.sum()
    loss.backward()
    expected = {f"{k}": initial[k] - LR * p.grad for k, p in module.network.named_parameters()}
    assert max_diff(trained[4], initial) > 1e-4, "the step moved the weights"
    assert max_diff({k: trained[4][k] for k in expected}, expected) < 1e-5
    for micro in (2, 1):
        assert max_diff(trained[micro], trained[4]) < 1e-5, f"micro-batch {micro} x accumulation {4 // micro}"
    # Teeth: each micro-batch normalized by its own tokens (TRL's per-micro-batch mean) would move them elsewhere.
    module.network.zero_grad()
    logps, mask = token_logps(module.network, rollouts.inputs, None)
    halves = torch.arange(len(mask)) < len(mask) // 2
    per_half = [-(rollouts.advantages[h, None] * logps[h] * mask[h]).sum() / mask[h].sum() for h in (halves, ~halves)]
    (sum(per_half) / 2).backward()
    mean_of_means = {k: initial[k] - LR * p.grad for k, p in module.network.named_parameters()}
    assert max_diff(mean_of_means, expected) > 1e-4


def test_num_iterations_reuses_the_rollouts_with_the_importance_ratio(tokenizer_dir, prompts_file, tmp_path):
    """``num_iterations=2``: the second step trains on the first step's prompts and completions (the data module
    repeats the step's batches), and its ratio is no longer 1 (the policy moved): the loss is not 0 any more. With
    ``beta > 0`` the KL to the frozen reference copy is logged: 0 at the start, positive once the policy moved; the
    copy is never trained."""
    module = system(tokenizer_dir, rl_config(num_iterations=2, beta=0.1))
    reference = {k: v.clone() for k, v in module.rl.reference.state_dict().items()}
    dm = data(tokenizer_dir, prompts_file, tmp_path, 2)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, limit_val_batches=0, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)  # fmt: skip
    losses = []
    original = module.rl._end_window

    def record(m):
        losses.append(float(module.rl._window_stats[0]) / float(module.rl._step_weight))
        original(m)

    module.rl._end_window = record
    trainer.fit(module, dm)
    assert module.rl._uses == 2 and module.rl._rollouts[0].old_logps is not None
    assert abs(losses[0]) < 1e-6 < abs(losses[1]), losses  # mean advantage 0 at ratio 1; not after the update
    assert trainer.callback_metrics["train/kl"] > 0
    assert max_diff({k: v for k, v in module.rl.reference.state_dict().items()}, reference) == 0


# ---------------------------------------------------------------------------------------------- the CLI
def grpo_args(tokenizer_dir: Path, prompts_file: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / "grpo.yaml"), f"--model.tokenizer={tokenizer_dir}",
            f"--data.init_args.path={prompts_file}", f"--data.init_args.cache_dir={tmp_path / 'cache'}",
            "--model.network.init_args.vocab_size=512", f"--runs_dir={tmp_path / 'runs'}", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        (["--model.rl.num_generations=1"], "model.rl.num_generations", "baseline"),
        (["--model.rl.normalization=mean"], "model.rl.normalization", "mean"),
        (["--model.rl.rewards=[{function: no_such_module:reward}]"], "model.rl.rewards[0].function", "cannot import"),
        (["--data=litune.data.text.TextDataModule", "--data.init_args.path=x.txt"], "data.class_path", "prompt"),
        (["--config", str(REPO / "configs" / "strategy" / "fsdp2.yaml")], "model.rl", "FSDP2"),
        (["--model.rl.max_completion_length=100"], "model.rl.max_completion_length", "context of 128 tokens"),
    ],
)
def test_bad_rl_configs_exit_2_naming_the_field_before_anything_is_written(
    extra, field, words, tokenizer_dir, prompts_file, tmp_path, capsys
) -> None:
    assert main(grpo_args(tokenizer_dir, prompts_file, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert field in err and words in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_quickstart_raises_the_held_out_reward(tokenizer_dir, prompts_file, tmp_path) -> None:
    """A short version of ``configs/grpo.yaml`` (the same config, smaller): held-out reward rises."""
    extra = ["--model.network.init_args.d_model=32", "--model.rl.max_completion_length=6",
             "--model.rl.num_generations=4", "--data.init_args.batch_size=4", "--data.init_args.val_fraction=0.25",
             "--model.optimizer.init_args.lr=1e-2", "--trainer.max_steps=30", "--trainer.val_check_interval=30",
             "--trainer.check_val_every_n_epoch=null", "--trainer.log_every_n_steps=10",
             "--trainer.enable_progress_bar=false", "--model.rl.log_completions_every_n_steps=30"]  # fmt: skip
    assert main(grpo_args(tokenizer_dir, prompts_file, tmp_path, *extra)) == 0
    (metrics,) = (tmp_path / "runs").glob("*/metrics.csv")
    val = [float(r["val/reward"]) for r in csv.DictReader(metrics.open()) if r.get("val/reward")]
    print(f"\nheld-out reward: {val}")
    assert len(val) == 2 and val[1] > val[0] + 0.3, val
    # litune report shows the rewards and the generation time of the step time.
    assert main(["report", str(metrics.parent), "--out", str(tmp_path / "report")]) == 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    for row in ("final val/reward", "final train/clip_ratio", "final val/rewards/char_fraction/mean",
                "mean generation time (s)"):  # fmt: skip
        assert f"| {row} |" in summary, summary
    assert (tmp_path / "report" / "reward.png").is_file()
    # The table of sample completions reached TensorBoard at step 30.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tables = []
    for events in metrics.parent.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
        accumulator.Reload()
        if "train/completions/text_summary" in accumulator.Tags()["tensors"]:
            tables += accumulator.Tensors("train/completions/text_summary")
    assert [t.step for t in tables] == [29]
    assert b"| step | prompt | completion |" in tables[0].tensor_proto.string_val[0]


# ---------------------------------------------------------------------------------------------- rollouts and data
@pytest.mark.parametrize("family", ["decoder", "hf-gpt2"])
def test_a_prompts_completions_do_not_depend_on_the_batch_it_shares(family, tokenizer_dir, prompts_file, tmp_path):
    """Per-prompt seeds: a prompt's group is the same generated alone or beside another (left-padded) prompt, with
    litune's batched generation (one generator per prompt) and with Hugging Face's loop (prompt by prompt)."""
    from litune.models.hf import HFCausalLM

    torch.manual_seed(0)
    if family == "decoder":
        network = DecoderLM(d_model=16, nhead=2, num_decoder_layers=1, vocab_size=VOCAB, max_seq_len=64, dropout=0.0)
    else:
        network = HFCausalLM(config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2,
                                     "vocab_size": VOCAB, "n_positions": 64})  # fmt: skip
    objective = GRPOObjective(rl_config(), network, False)
    dm = data(tokenizer_dir, prompts_file, tmp_path, 2)
    objective.tokenizer = dm.tokenizer
    dm.setup("fit")
    collate = dm.collator()
    rows = [dm.train_set[i] for i in (1, 3)]  # prompts of 2 and 4 words: the first is left-padded beside the second
    together = objective.generate(network, collate(rows), step=7)
    alone = objective.generate(network, collate(rows[:1]), step=7)
    g = objective.config.num_generations
    width = min(alone.size(1), together.size(1))
    assert torch.equal(together[:g, :width], alone[:, :width])
    assert not torch.equal(objective.generate(network, collate(rows[:1]), step=8)[:, :width], alone[:, :width])


def test_a_row_without_a_prompt_is_refused_with_file_row_and_field(tokenizer_dir, tmp_path) -> None:
    from litune.errors import ConfigError

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "def f():"}) + "\n" + json.dumps({"prompt": 5}) + "\n")
    with pytest.raises(ConfigError) as err:
        data(tokenizer_dir, path, tmp_path / "cache", 2).setup("fit")
    assert err.value.field == "data.init_args.prompt_column" and "row 2" in str(err.value) and err.value.fix


def test_repeated_windows_yield_each_steps_batches_num_iterations_times() -> None:
    """5 batches, 2 per optimizer step, 2 iterations: each step's pair twice; the incomplete last pair is dropped."""
    from litune.rl.data import RepeatedWindows

    batches = list(RepeatedWindows(range(10), batch_size=2, window=2, repeats=2))
    assert batches == [[0, 1], [2, 3], [0, 1], [2, 3], [4, 5], [6, 7], [4, 5], [6, 7]]
    assert len(RepeatedWindows(range(10), batch_size=2, window=2, repeats=2)) == len(batches)
    # Resumed after 1 of the first window's 2 steps: its second repeat, then on as before.
    resumed = RepeatedWindows(range(10), batch_size=2, window=2, repeats=2, done=1)
    assert len(resumed) == 6 and list(resumed) == batches[2:]
