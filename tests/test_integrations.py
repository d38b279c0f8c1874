"""The framework callbacks, on real Trainers: transformers.Trainer and lightning.Trainer."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.nn.modules import module as torch_module

from modtimeline.analysis.reader import read_trace
from modtimeline.errors import ModTimelineError

pytestmark = pytest.mark.slow

LAYERS = 2


def _hooks_gone() -> bool:
    return not torch_module._global_forward_pre_hooks and not torch_module._global_forward_hooks


def _spans(path: Path) -> tuple[dict, Counter, list[int]]:
    trace = read_trace(path)
    counts = Counter((span.name, span.phase, span.step) for span in trace.spans if span.phase != "step")
    return trace.metadata, counts, sorted(trace.step_ns)


# ---------------------------------------------------------------- transformers
def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, fail_at: int | None = None) -> None:
        generator = torch.Generator().manual_seed(1)
        self.items = [torch.randint(0, 64, (8,), generator=generator) for _ in range(n)]
        self.fail_at = fail_at

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index == self.fail_at:
            raise RuntimeError("a damaged sample")
        return {"input_ids": self.items[index], "labels": self.items[index]}


def _trainer(tmp_path: Path, callback, max_steps: int, dataset=None, eval_dataset=None):
    from transformers import Trainer, TrainingArguments

    evaluating = {"eval_strategy": "steps", "eval_steps": 1} if eval_dataset is not None else {}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, learning_rate=1e-3,
                             per_device_eval_batch_size=2, **evaluating)
    return Trainer(model=_llama(), args=args, train_dataset=dataset or _Tokens(32), eval_dataset=eval_dataset,
                   callbacks=[callback])


def test_transformers_one_step_per_optimizer_step_evaluation_left_out(tmp_path):
    from modtimeline.integrations.transformers import TimelineCallback

    callback = TimelineCallback(tmp_path / "traces" / "run.json")
    trainer = _trainer(tmp_path, callback, max_steps=3, eval_dataset=_Tokens(4))
    trainer.train()
    assert _hooks_gone()
    metadata, counts, steps = _spans(tmp_path / "traces" / "run.json")
    assert steps == [0, 1, 2] and trainer.state.global_step == 3
    assert len([entry for entry in trainer.state.log_history if "eval_loss" in entry]) == 3
    assert "exception" not in metadata
    for step in steps:
        for layer in range(LAYERS):
            name = f"LlamaForCausalLM.model.layers.{layer}"
            assert counts[(name, "forward", step)] == 2, counts  # two micro-batches inside each step
            assert counts[(name, "backward", step)] == 2
    # Evaluation ran after every step (4 samples, 2 batches each time), outside the steps: not recorded.
    assert {step for (_, _, step) in counts} == {0, 1, 2}
    assert sum(n for (name, phase, _), n in counts.items() if name == "LlamaForCausalLM" and phase == "forward") == 6


def test_transformers_a_run_that_raises_leaves_a_complete_trace(tmp_path):
    from modtimeline.integrations.transformers import TimelineCallback

    callback = TimelineCallback(tmp_path / "run.json")
    # 2 samples a batch, 2 batches a step: sample 10 is loaded for the third step
    trainer = _trainer(tmp_path, callback, max_steps=5, dataset=_Tokens(32, fail_at=10))
    with pytest.raises(RuntimeError, match="a damaged sample"):  # the user's exception, unchanged
        trainer.train()
    assert _hooks_gone() and not callback.timeline.started
    metadata, counts, steps = _spans(tmp_path / "run.json")
    assert "a damaged sample" in metadata["exception"]
    assert steps[:2] == [0, 1]
    assert counts[("LlamaForCausalLM.model.layers.1", "backward", 1)] == 2


def test_transformers_an_error_inside_a_step_of_a_callback_added_later(tmp_path):
    from modtimeline.integrations.transformers import TimelineCallback

    callback = TimelineCallback(tmp_path / "run.json")
    trainer = _trainer(tmp_path, TimelineCallback(tmp_path / "unused.json"), max_steps=5)
    trainer.pop_callback(TimelineCallback)
    trainer.add_callback(callback)  # not there at __init__: wrapped at train()
    layer = trainer.model.model.layers[1]
    calls = []

    def fail_on_the_fifth_call(module, args):
        calls.append(1)
        if len(calls) == 5:
            raise ValueError("NaN in layer 1")

    layer.register_forward_pre_hook(fail_on_the_fifth_call)
    with pytest.raises(ValueError, match="NaN in layer 1"):
        trainer.train()
    assert not callback.timeline.started
    metadata, counts, steps = _spans(tmp_path / "run.json")
    assert "NaN in layer 1" in metadata["exception"] and steps == [0, 1, 2]
    assert counts[("LlamaForCausalLM.model.layers.0", "forward", 2)] == 1
    assert not (tmp_path / "unused.json").exists()


def test_transformers_callback_refuses_a_mistyped_name_at_once(tmp_path):
    from modtimeline.integrations.transformers import TimelineCallback

    with pytest.raises(ModTimelineError, match="pftrace"):
        TimelineCallback(tmp_path / "run.pftrce")


# ------------------------------------------------------------------- lightning
def _lightning_module(fail_at_step: int | None = None):
    import lightning.pytorch as pl

    class Blocks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()) for _ in range(LAYERS))
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    class LitBlocks(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = Blocks()
            self.loss = torch.nn.MSELoss()
            self.validation_calls = 0

        def training_step(self, batch, batch_idx):
            if fail_at_step is not None and self.trainer.global_step == fail_at_step:
                raise RuntimeError("loss went NaN")
            x, y = batch
            return self.loss(self.model(x), y)

        def validation_step(self, batch, batch_idx):
            self.validation_calls += 1
            x, y = batch
            return self.loss(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return LitBlocks()


def _loader(n: int = 16):
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 8, generator=generator), torch.randn(n, 1, generator=generator))
    return torch.utils.data.DataLoader(data, batch_size=2)


def _lightning_trainer(tmp_path: Path, callback, max_steps: int):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=2,
                      callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), val_check_interval=2,
                      num_sanity_val_steps=1, limit_val_batches=2)


def test_lightning_one_step_per_optimizer_step_validation_left_out(tmp_path):
    from modtimeline.integrations.lightning import TimelineCallback

    callback = TimelineCallback(tmp_path / "run.json")
    module = _lightning_module()
    _lightning_trainer(tmp_path, callback, max_steps=3).fit(module, _loader(), _loader(4))
    assert _hooks_gone() and module.validation_calls >= 3
    metadata, counts, steps = _spans(tmp_path / "run.json")
    assert steps == [0, 1, 2]
    for step in steps:
        for layer in range(LAYERS):
            name = f"LitBlocks.model.layers.{layer}"  # named as the LightningModule's state_dict names it
            assert counts[(name, "forward", step)] == 2, counts  # two micro-batches in each optimizer step
            assert counts[(name, "backward", step)] == 2
        assert counts[("LitBlocks.loss", "forward", step)] == 2
    # sanity check and validation (2 batches after every second batch) ran between steps: not recorded
    assert sum(n for (name, phase, _), n in counts.items() if name == "LitBlocks.model" and phase == "forward") == 6


def test_lightning_a_run_that_raises_leaves_a_complete_trace(tmp_path):
    from modtimeline.integrations.lightning import TimelineCallback

    callback = TimelineCallback(tmp_path / "run.json")
    with pytest.raises(RuntimeError, match="loss went NaN"):
        _lightning_trainer(tmp_path, callback, max_steps=5).fit(_lightning_module(fail_at_step=2), _loader())
    assert _hooks_gone() and not callback.timeline.started
    metadata, counts, steps = _spans(tmp_path / "run.json")
    assert "loss went NaN" in metadata["exception"]
    assert steps == [0, 1, 2]  # the step that raised is there, flagged incomplete
    assert counts[("LitBlocks.model.layers.1", "backward", 1)] == 2


def test_missing_framework_is_one_clear_line(monkeypatch):
    import sys

    from modtimeline import integrations

    monkeypatch.setitem(sys.modules, "no_such_framework", None)
    with pytest.raises(ModTimelineError, match="pip install no-such-framework") as raised:
        integrations.require("no_such_framework", "no-such-framework", "modtimeline.integrations.x")
    assert "\n" not in str(raised.value)
    assert os.environ.get("MODTIMELINE_TEST_NEVER_SET") is None
