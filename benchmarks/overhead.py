"""Tracer overhead per module call and per step, and where it goes (issue 26).

Workloads (a model and its training step: forward + loss, then ``.backward()``):

- ``tiny-modules``: 200 x Sequential(Linear(8, 8), ReLU), batch 4 (601 module calls a
  step): the per-call cost is nearly all there is;
- ``encoder``: Embedding + 6-layer ``nn.TransformerEncoder`` (d_model 64) + Linear head,
  batch 8 x 32 tokens, cross-entropy (58 calls);
- ``llama`` / ``gpt2``: transformers' LlamaForCausalLM / GPT2LMHeadModel from small random
  configs (hidden 64, 4 layers, vocab 256; nothing is downloaded), batch 4 x 32 tokens,
  the model's own LM loss;
- ``cnn`` (a small ResNet, 8 x 3 x 32 x 32) and ``transformer`` (12-layer encoder,
  d_model 128, batch 8 x 64); only when named: ``transformer-compiled`` (that under
  torch.compile) and ``tiny-modules-16`` (100 x (Linear(16, 16), ReLU): the tiny model
  before issue 26).

Rows per workload: untraced; the floor (no-op global forward hooks: a pre-hook and an
always-called hook, the least any global-hook tracer pays); ``Timeline`` in steady state
(one Timeline over the round's steps, each marked ``with tl.step():``, its file written
once after them, not timed; and so with ``record_between_steps=False``, off between steps,
as the integrations make it); ``Timeline`` per step (``with Timeline(path): step()``, the
file written every step) and its floor (the floor's hooks put into torch and taken out
around each step, then a file of the per-step trace's size written, new file renamed over
the old: the least a tracer that writes a file per step pays); and on tiny-modules,
tiny-modules-16, transformer, cnn and transformer-compiled torch's ModuleTracker,
ModTracker and torch.profiler(with_modules) (at most 5 timed steps a block: they are
there for comparison, and slow).

Interleaved: every round runs each row once, in a fresh random order, as a block of
--steps-per-round steps (after --warmup-steps untimed ones); a row's figure in a round is
the median of its block's steps, its ratio and added time are taken against the untraced
block of the same round, and the tables give medians over rounds: this shared machine's
speed swings by 30-50 % within minutes, and a ratio taken within one round cancels that.
Garbage is collected before every step (the heap built at start-up is frozen first, so
that costs microseconds), and torch runs one thread (--threads). Each step is timed in
parts: its forward (with the loss), its backward, and the step boundary (what the row
wraps each step in: ``tl.step()``'s entry and exit, a per-step Timeline's start, stop and
write); the steady Timeline's stop() (resolve + write) is timed apart and divided over its
steps: the "where the time goes" table.

    python benchmarks/overhead.py [--reps 15] [--steps-per-round N] [--out benchmarks/results]
    python benchmarks/overhead.py --workloads tiny-modules encoder llama gpt2 --no-integrations
    python benchmarks/overhead.py --workloads             # the integrations' table only
    python benchmarks/overhead.py --no-integrations       # the workloads' tables only
    python benchmarks/overhead.py --render results/overhead.json   # the tables again, from the JSON

Integrations (one row each; --rounds interleaved rounds, each running the untraced and the
traced training once, in a fresh random order): a tiny random LlamaForCausalLM trained by
transformers.Trainer, a tiny LightningModule trained by lightning.Trainer, and a plain loop
script run as `python script.py` and as `python -m modtimeline record -o OUT -- python
script.py` (a fresh process each). A step is the time from one step's start to the next's
(on_step_begin, on_train_batch_start; in the script, optimizer step to optimizer step), so
it holds the framework's and the callback's work between steps; the first steps of each
run are left out, and so are train()'s start and the trace written at its end.

Prints markdown tables and writes overhead.json / overhead.md under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from report import machine, save

from modtimeline import ModuleTracker as OurTracker
from modtimeline import Timeline

# A workload: the model, and its forward (with the loss) returning the loss to backward.
Forward = Callable[[nn.Module], torch.Tensor]
Workload = tuple[nn.Module, Forward]


def _summed(x: torch.Tensor) -> Forward:
    return lambda m: m(x).sum()


def tiny_modules() -> Workload:
    """200 x Sequential(Linear(8, 8), ReLU), batch 4: 601 module calls a step, each tiny."""
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(200)])
    return model, _summed(torch.randn(4, 8))


def tiny_modules_16() -> Workload:
    """100 x (Linear(16, 16), ReLU), batch 4: 201 calls (the tiny model before issue 26)."""
    layers: list[nn.Module] = []
    for _ in range(100):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    return nn.Sequential(*layers), _summed(torch.randn(4, 16))


def encoder() -> Workload:
    """Embedding + 6-layer nn.TransformerEncoder (d_model 64, 4 heads, ff 256) + Linear head,
    batch 8 x 32 tokens, cross-entropy: 58 module calls."""
    layer = nn.TransformerEncoderLayer(64, 4, 256, batch_first=True)
    model = nn.Sequential(nn.Embedding(256, 64), nn.TransformerEncoder(layer, 6, enable_nested_tensor=False),
                          nn.Linear(64, 256))
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))

    def forward(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(tokens).flatten(0, 1), tokens.flatten())

    return model, forward


def _causal_lm(model: nn.Module) -> Workload:
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))

    def forward(m: nn.Module) -> torch.Tensor:
        return m(input_ids=tokens, labels=tokens).loss

    return model, forward


def llama() -> Workload:
    """A random LlamaForCausalLM (hidden 64, 4 layers, 4 heads, vocab 256), batch 4 x 32."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return _causal_lm(LlamaForCausalLM(config))  # random init: nothing is downloaded


def gpt2() -> Workload:
    """A random GPT2LMHeadModel (n_embd 64, 4 layers, 4 heads, vocab 256), batch 4 x 32."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=4, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return _causal_lm(GPT2LMHeadModel(config))


def transformer() -> Workload:
    """A 12-layer small transformer encoder, batch 8 x 64 tokens."""
    layer = nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=12, enable_nested_tensor=False)
    return model, _summed(torch.randn(8, 64, 128))


def cnn() -> Workload:
    """A small ResNet-like CNN on 8 x 3 x 32 x 32 images."""

    class Residual(nn.Module):
        def __init__(self, ch: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(ch)
            self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(ch)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        *[Residual(32) for _ in range(4)], nn.MaxPool2d(2),
        *[Residual(32) for _ in range(4)], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    return model, _summed(torch.randn(8, 3, 32, 32))


def compiled_transformer() -> Workload:
    """The transformer under torch.compile (inductor): a Timeline sees one call per step."""
    model, forward = transformer()
    compiled: nn.Module = torch.compile(model)  # type: ignore[assignment]
    return model, lambda m: forward(compiled)


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "tiny-modules": tiny_modules, "encoder": encoder, "llama": llama, "gpt2": gpt2,
    "transformer": transformer, "cnn": cnn,
    "transformer-compiled": compiled_transformer, "tiny-modules-16": tiny_modules_16,
}
DEFAULT_WORKLOADS = ["tiny-modules", "encoder", "llama", "gpt2", "cnn", "transformer"]
# The workloads that had torch's trackers' rows before issue 26 keep them.
TORCH_ROWS = {"tiny-modules", "tiny-modules-16", "transformer", "cnn", "transformer-compiled"}
TORCH_ROW_STEPS = 5  # timed steps a block at most in those rows

UNTRACED = "untraced"
FLOOR = "no-op global hooks (floor)"
STEADY = "Timeline steady"
# The integrations' way (callbacks, `record`): record_between_steps=False.
OFF_BETWEEN = "Timeline steady, off between steps"
PER_STEP = "Timeline per step (file written)"
# What any tracer that sees every call and writes its file every step pays at least.
PER_STEP_FLOOR = "floor per step: hooks in and out, a file written"
# The floor each goal's row is measured against.
FLOOR_OF = {STEADY: FLOOR, OFF_BETWEEN: FLOOR, PER_STEP: PER_STEP_FLOOR}

# Issue 26's goals: (workload, row, figure, at most).
GOALS: list[tuple[str, str, str, float]] = [
    ("tiny-modules", STEADY, "vs_floor_added", 1.3),
    ("encoder", STEADY, "ratio", 1.02),
    ("encoder", PER_STEP, "ratio", 1.05),
    ("llama", STEADY, "ratio", 1.03),
    ("gpt2", STEADY, "ratio", 1.03),
]


def module_calls(model: nn.Module, step: Callable[[nn.Module], None]) -> int:
    tracker, calls = _call_counter()
    with tracker:
        step(model)
    return calls()


# ------------------------------------------------------------------ rows
ContextFactory = Callable[[], contextlib.AbstractContextManager[Any]]

# Two clocks: the process's CPU time (the default: on this shared, loaded machine it leaves
# out the time the process waited for a core, which wall time counts) and wall time.
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def _now() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


@dataclass
class Row:
    """What a row wraps around each step (``around``), and what it does before its block of
    steps (``setup``) and after it (``teardown``), both outside the step figures."""

    around: ContextFactory
    setup: Callable[[], None] = lambda: None
    teardown: Callable[[], None] = lambda: None
    # The steady Timeline times its own start() and stop(): (cpu, wall) seconds each.
    start_s: list[tuple[float, float]] = field(default_factory=list)
    stop_s: list[tuple[float, float]] = field(default_factory=list)
    # At most this many timed steps a block (torch's trackers: kept for comparison, and slow).
    max_steps: int | None = None


def floor_row() -> Row:
    """No-op global forward hooks: torch's hook dispatch and nothing else."""
    handles: list[Any] = []

    def setup() -> None:
        modules = torch.nn.modules.module
        handles.append(modules.register_module_forward_pre_hook(lambda m, a: None))
        handles.append(modules.register_module_forward_hook(lambda m, a, o: None, always_call=True))

    def teardown() -> None:
        while handles:
            handles.pop().remove()

    return Row(contextlib.nullcontext, setup, teardown)


def per_step_floor_row(trace_dir: Path) -> Row:
    """The least a per-step tracer pays: the floor's two no-op global hooks put into torch
    as the step starts and taken out as it ends (nothing may stay in torch after a
    tracer's stop), and then as many bytes as the per-step Timeline's last trace written
    the textbook atomic way (a new file, renamed over the old one with ``os.replace``).
    No names, no times kept, no resolve, no encoding."""
    payload: list[bytes] = []
    path = trace_dir / "per_step_floor.json"
    temporary = str(path) + ".tmp"
    hooks = floor_row()

    def setup() -> None:
        sample = trace_dir / "per_step.json"
        payload[:] = [sample.read_bytes() if sample.exists() else b" " * 20_000]

    @contextlib.contextmanager
    def around() -> Iterator[None]:
        hooks.setup()
        try:
            yield
        finally:
            hooks.teardown()
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, payload[0])
            finally:
                os.close(fd)
            os.replace(temporary, path)

    return Row(around, setup)


def _elapsed(start: tuple[float, float]) -> tuple[float, float]:
    end = _now()
    return end[0] - start[0], end[1] - start[1]


def steady_row(path: Path, record_between_steps: bool = True) -> Row:
    """One Timeline over the block's steps, each `with tl.step():`; written once, after them."""
    holder: list[Timeline] = []

    def around() -> contextlib.AbstractContextManager[Any]:
        return holder[0].step()

    def setup() -> None:
        timeline = Timeline(path, record_between_steps=record_between_steps)
        gc.collect()
        start = _now()
        timeline.start()
        row.start_s.append(_elapsed(start))
        holder[:] = [timeline]

    def teardown() -> None:
        gc.collect()
        start = _now()
        holder[0].stop()
        row.stop_s.append(_elapsed(start))
        holder.clear()

    row = Row(around, setup, teardown)
    return row


def rows_for(workload: str, trace_dir: Path, torch_rows: bool) -> dict[str, Row]:
    rows = {
        UNTRACED: Row(contextlib.nullcontext),
        FLOOR: floor_row(),
        STEADY: steady_row(trace_dir / "steady.json"),
        OFF_BETWEEN: steady_row(trace_dir / "off_between.json", record_between_steps=False),
        PER_STEP: Row(lambda: Timeline(trace_dir / "per_step.json")),
        PER_STEP_FLOOR: per_step_floor_row(trace_dir),
    }
    if torch_rows and workload in TORCH_ROWS:
        from torch.distributed._tools.mod_tracker import ModTracker
        from torch.utils.module_tracker import ModuleTracker

        def profiler() -> contextlib.AbstractContextManager[Any]:
            return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_modules=True)

        rows["torch ModuleTracker"] = Row(ModuleTracker, max_steps=TORCH_ROW_STEPS)
        rows["torch ModTracker"] = Row(ModTracker, max_steps=TORCH_ROW_STEPS)
        rows["torch.profiler"] = Row(profiler, max_steps=TORCH_ROW_STEPS)
    return rows


# One step's parts (seconds): the whole step, its forward (with the loss), its backward,
# and the boundary (the row's context entered and left: whole - forward - backward).
PARTS = ("step", "forward", "backward", "boundary")
Parts = dict[str, float]


def timed_step(model: nn.Module, forward: Forward, around: ContextFactory) -> dict[str, Parts]:
    """One step, timed in parts on both clocks: {clock: {part: seconds}}."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    c0, w0 = _now()
    with around():
        c1, w1 = _now()
        loss = forward(model)
        c2, w2 = _now()
        loss.backward()
        c3, w3 = _now()
    c4, w4 = _now()
    return {"cpu": {"step": c4 - c0, "forward": c2 - c1, "backward": c3 - c2, "boundary": (c1 - c0) + (c4 - c3)},
            "wall": {"step": w4 - w0, "forward": w2 - w1, "backward": w3 - w2, "boundary": (w1 - w0) + (w4 - w3)}}


def _settle() -> None:
    """Collect, then freeze what survived: the collection before each step then only walks the
    objects made since (what a row keeps, torch's ModTracker's hooks say, would otherwise make
    every later collection slower, up to 0.2 s each)."""
    gc.collect()
    gc.freeze()


def run_block(model: nn.Module, forward: Forward, row: Row, warmup: int, steps: int) -> dict[str, Parts]:
    """The row's block of steps: each part's median over the timed steps, on each clock."""
    steps = min(steps, row.max_steps or steps)
    row.setup()
    try:
        samples = [timed_step(model, forward, row.around) for _ in range(warmup + steps)][warmup:]
    finally:
        row.teardown()
        _settle()
    return {clock: {part: statistics.median(s[clock][part] for s in samples) for part in PARTS} for clock in CLOCKS}


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def auto_steps(step_s: float, target_s: float) -> int:
    """Steps per block: enough for about target_s of untraced steps, 3 to 20."""
    return max(3, min(20, round(target_s / max(step_s, 1e-6))))


def measure(workload: str, reps: int, trace_dir: Path, steps_per_round: int | None = None, warmup: int = 1,
            torch_rows: bool = True, clock: str = "cpu", block_s: float = 0.1) -> dict[str, Any]:
    torch.manual_seed(0)
    model, forward = WORKLOADS[workload]()
    model.train()

    def step(m: nn.Module) -> None:
        forward(m).backward()

    step(model)  # (a compiled workload compiles here, outside every measurement)
    calls = max(module_calls(model, step), 1)
    rows = rows_for(workload, trace_dir, torch_rows)
    _settle()  # what exists now is never garbage: the collections before each step stay cheap
    try:
        probe = [timed_step(model, forward, contextlib.nullcontext)["cpu"]["step"] for _ in range(3)]
        steps = steps_per_round or auto_steps(statistics.median(probe), block_s)
        blocks: dict[str, list[dict[str, Parts]]] = {name: [] for name in rows}
        order = random.Random(0)
        for round_ in range(reps + 1):  # the first round warms up
            names = list(rows)
            order.shuffle(names)
            for name in names:
                block = run_block(model, forward, rows[name], warmup, steps)
                if round_ >= 1:
                    blocks[name].append(block)
    finally:
        gc.unfreeze()
    steady = rows[STEADY]
    del steady.start_s[0], steady.stop_s[0]  # (the warm-up round's)
    other = "wall" if clock == "cpu" else "cpu"
    figures = {name: summarise({row: [b[name] for b in samples] for row, samples in blocks.items()}, calls,
                               warmup + steps, [s[index] for s in steady.start_s],
                               [s[index] for s in steady.stop_s])
               for index, name in enumerate(CLOCKS)}
    return {
        "module_calls_per_step": calls,
        "steps_per_round": steps,
        "warmup_steps": warmup,
        "rounds": reps,
        "clock": clock,
        "untraced_us_per_call": figures[clock]["variants"][UNTRACED]["step_ms"] / calls * 1e3,
        **figures[clock],
        "other_clock": {"clock": other, **figures[other]},
    }


def summarise(blocks: dict[str, list[Parts]], calls: int, steady_steps: int, start_s: list[float],
              stop_s: list[float]) -> dict[str, Any]:
    """One clock's figures: per row, medians over rounds of the round's figures."""
    base = blocks[UNTRACED]

    def added(name: str, part: str, against: str = UNTRACED) -> list[float]:
        """Per round: this row's part minus the other row's, in µs per module call."""
        return [(b[part] - a[part]) / calls * 1e6 for b, a in zip(blocks[name], blocks[against])]

    variants: dict[str, dict[str, Any]] = {}
    for name, samples in blocks.items():
        ratios = [b["step"] / u["step"] for b, u in zip(samples, base)]
        low, high = _quartiles(ratios)
        variants[name] = {
            "step_ms": statistics.median(b["step"] for b in samples) * 1e3,
            "ratio": statistics.median(ratios),
            "ratio_p25": low,
            "ratio_p75": high,
            "added_us_per_call": statistics.median(added(name, "step")),
            "per_round_ratios": ratios,
            "per_round_added_us_per_call": added(name, "step"),
        }
    floor_added = variants[FLOOR]["added_us_per_call"]
    tracker_added = variants.get("torch ModuleTracker", {}).get("added_us_per_call")
    for name in (STEADY, OFF_BETWEEN, PER_STEP):
        row = variants[name]
        # Ratios of the medians: per round, the floor's few µs are too noisy to divide by.
        row["vs_floor_added"] = row["added_us_per_call"] / floor_added if floor_added > 0 else None
        own_floor = variants[FLOOR_OF[name]]["added_us_per_call"]
        row["vs_own_floor_added"] = row["added_us_per_call"] / own_floor if own_floor > 0 else None
        if tracker_added is not None:
            row["vs_ModuleTracker_added"] = row["added_us_per_call"] / tracker_added if tracker_added > 0 else None

    breakdown: dict[str, dict[str, Any]] = {}
    for name in (FLOOR, STEADY, OFF_BETWEEN, PER_STEP, PER_STEP_FLOOR):
        parts: dict[str, Any] = {f"{part}_us_per_call": statistics.median(added(name, part))
                                 for part in ("forward", "backward", "boundary")}
        parts["boundary_ms_per_step"] = statistics.median(
            (b["boundary"] - u["boundary"]) * 1e3 for b, u in zip(blocks[name], base))
        parts["step_us_per_call"] = variants[name]["added_us_per_call"]
        if name != FLOOR:  # our forward work beyond torch's hook dispatch, round by round
            parts["forward_beyond_floor_us_per_call"] = statistics.median(added(name, "forward", FLOOR))
        breakdown[name] = parts
    breakdown[STEADY].update({
        "start_ms": statistics.median(start_s) * 1e3,
        "stop_ms": statistics.median(stop_s) * 1e3,
        "steps_per_timeline": steady_steps,
        "resolve_write_ms_per_step": statistics.median(stop_s) / steady_steps * 1e3,
        "resolve_write_us_per_call": statistics.median(stop_s) / steady_steps / calls * 1e6,
    })
    return {"variants": variants, "breakdown": breakdown}


# ------------------------------------------------------------------ integrations
# Each integration: (what it is, how to make a runner). A runner takes (traced, folder)
# and returns the step times (seconds) of one training run past its warm-up steps.
INTEGRATION_WARMUP = 3


def _torch_step_clock() -> tuple[list[float], Callable[[], None]]:
    marks: list[float] = []
    return marks, lambda: marks.append(time.perf_counter())


def _periods(marks: list[float]) -> list[float]:
    return [b - a for a, b in zip(marks, marks[1:])][INTEGRATION_WARMUP:]


def transformers_trainer(steps: int) -> tuple[str, Callable[[bool, Path], list[float]], Callable[[Path], float]]:
    """A random 4-layer LlamaForCausalLM (hidden 64), batch 4 x 32 tokens, AdamW, on
    transformers.Trainer; traced: modtimeline.integrations.transformers.TimelineCallback."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    from modtimeline.integrations.transformers import TimelineCallback

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config)  # random init: nothing is downloaded
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, 256, (32,), generator=generator) for _ in range(4 * (steps + 1))]
    data = [{"input_ids": t, "labels": t} for t in tokens]

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks, self.mark = _torch_step_clock()

        def on_step_begin(self, args: object, state: object, control: object, **kwargs: object) -> None:
            self.mark()

    def trainer(folder: Path, callbacks: list[Any], max_steps: int) -> Trainer:
        args = TrainingArguments(output_dir=str(folder / "out"), max_steps=max_steps, per_device_train_batch_size=4,
                                 report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0, learning_rate=1e-4)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # (it prints the run's metrics at its end)
        return trainer

    def run(traced: bool, folder: Path) -> list[float]:
        clock = StepClock()
        callbacks: list[Any] = [clock] + ([TimelineCallback(folder / "hf.json")] if traced else [])
        trainer(folder, callbacks, steps).train()
        return _periods(clock.marks)

    def calls(folder: Path) -> float:
        tracker, count = _call_counter()
        with tracker:
            trainer(folder, [], 4).train()
        return count() / 4

    return "transformers.Trainer + TimelineCallback (tiny LlamaForCausalLM)", run, calls


def lightning_trainer(steps: int) -> tuple[str, Callable[[bool, Path], list[float]], Callable[[Path], float]]:
    """A LightningModule holding 16 x (Linear(128, 128) + ReLU) and an MSE loss, batch 32,
    SGD, on lightning.Trainer; traced: modtimeline.integrations.lightning.TimelineCallback."""
    import lightning.pytorch as pl

    from modtimeline.integrations.lightning import TimelineCallback

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)

    class LitBlocks(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for _ in range(16):
                layers += [nn.Linear(128, 128), nn.ReLU()]
            self.model = nn.Sequential(*layers, nn.Linear(128, 1))
            self.loss = nn.MSELoss()

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return self.loss(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    module = LitBlocks()
    generator = torch.Generator().manual_seed(0)
    n = 32 * (steps + 1)
    data = torch.utils.data.TensorDataset(torch.randn(n, 128, generator=generator), torch.randn(n, 1, generator=generator))
    loader = torch.utils.data.DataLoader(data, batch_size=32)

    class StepClock(pl.Callback):
        def __init__(self) -> None:
            self.marks, self.mark = _torch_step_clock()

        def on_train_batch_start(self, trainer: object, pl_module: object, batch: object, batch_idx: int) -> None:
            self.mark()

    def fit(folder: Path, callbacks: list[Any], max_steps: int) -> None:
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(folder), limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, loader)

    def run(traced: bool, folder: Path) -> list[float]:
        clock = StepClock()
        fit(folder, [clock] + ([TimelineCallback(folder / "pl.json")] if traced else []), steps)
        return _periods(clock.marks)

    def calls(folder: Path) -> float:
        tracker, count = _call_counter()
        with tracker:
            fit(folder, [], 4)
        return count() / 4

    return "lightning.Trainer + TimelineCallback (tiny LightningModule)", run, calls


# The plain loop `modtimeline record` traces: no modtimeline in it. It prints nothing and
# writes its step times (optimizer step to optimizer step) as JSON to argv[2].
RECORD_SCRIPT = """
import json, sys, time
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 256, batch_first=True)
    model = nn.Sequential(nn.Embedding(256, 64), nn.TransformerEncoder(layer, 4, enable_nested_tensor=False),
                          nn.Linear(64, 256))
    tokens = torch.randint(0, 256, (8, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        optimizer.step()

    return model, step


if __name__ == "__main__":
    steps, out = int(sys.argv[1]), sys.argv[2]
    model, step = make()
    ends = []
    for _ in range(steps):
        step()
        ends.append(time.perf_counter())
    with open(out, "w") as file:
        json.dump([b - a for a, b in zip(ends, ends[1:])], file)
"""


def record_script(steps: int) -> tuple[str, Callable[[bool, Path], list[float]], Callable[[Path], float]]:
    """A plain loop (4-layer nn.TransformerEncoder LM, batch 8 x 32 tokens, SGD) run as
    `python script.py` and as `python -m modtimeline record -o OUT -- python script.py`."""

    def run(traced: bool, folder: Path) -> list[float]:
        script = folder / "train_loop.py"
        if not script.exists():
            script.write_text(RECORD_SCRIPT)
        out = folder / "steps.json"
        command = [sys.executable, str(script), str(steps), str(out)]
        if traced:
            command = [sys.executable, "-m", "modtimeline", "record", "-o", str(folder / "rec.json"), "--", *command]
        subprocess.run(command, check=True, cwd=folder, stdout=subprocess.DEVNULL, env=os.environ.copy())
        times = json.loads(out.read_text())
        out.unlink()
        return list(times[INTEGRATION_WARMUP:])

    def calls(folder: Path) -> float:
        namespace: dict[str, object] = {"__name__": "train_loop"}
        exec(compile(RECORD_SCRIPT, "train_loop.py", "exec"), namespace)
        model, step = namespace["make"]()  # type: ignore[operator]
        return module_calls(model, lambda m: step())

    return "`modtimeline record` (plain loop script, fresh process each)", run, calls


INTEGRATIONS = {"transformers": transformers_trainer, "lightning": lightning_trainer, "record": record_script}


def _call_counter() -> tuple[OurTracker, Callable[[], int]]:
    calls = 0

    def count(module: nn.Module, args: object) -> None:
        nonlocal calls
        calls += 1

    tracker = OurTracker()
    tracker.register_user_hooks(pre_fw_hook=count)
    return tracker, lambda: calls


def measure_integration(name: str, rounds: int, steps: int, folder: Path) -> dict[str, object]:
    title, run, count_calls = INTEGRATIONS[name](steps)
    folder = folder / name
    folder.mkdir()
    calls = max(count_calls(folder), 1.0)
    run(False, folder)  # warm up: first imports, first allocations
    order = random.Random(0)
    per_round: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        sides = [False, True]
        order.shuffle(sides)
        for traced in sides:
            gc.collect()
            per_round[traced].append(statistics.median(run(traced, folder)))
    untraced, traced_ = per_round[False], per_round[True]
    return {
        "title": title,
        "module_calls_per_step": calls,
        "steps_per_run": steps,
        "untraced_step_ms": statistics.median(untraced) * 1e3,
        "traced_step_ms": statistics.median(traced_) * 1e3,
        "ratio": statistics.median(t / u for t, u in zip(traced_, untraced)),
        "added_us_per_call": statistics.median((t - u) / calls * 1e6 for t, u in zip(traced_, untraced)),
    }


def integrations_markdown(results: dict[str, object]) -> str:
    lines = [f"**Integrations** (medians of {results['rounds']} interleaved rounds; in each round one untraced and "
             f"one traced run of {results['steps']} steps, the first {INTEGRATION_WARMUP} steps left out, each run's "
             "median step taken; ratio and added time within each round)", "",
             "| way in | module calls per step | step untraced (ms) | step traced (ms) | × untraced "
             "| added µs / module call (fw+bw) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in results["rows"].values():  # type: ignore[attr-defined]
        lines.append(f"| {row['title']} | {row['module_calls_per_step']:.0f} | {row['untraced_step_ms']:.2f} "
                     f"| {row['traced_step_ms']:.2f} | {row['ratio']:.3f} | {row['added_us_per_call']:.2f} |")
    lines.append("")
    return "\n".join(lines)


def _num(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def workload_markdown(workload: str, result: dict[str, Any]) -> list[str]:
    lines = [f"**{workload}** ({result['module_calls_per_step']} module calls per step, untraced "
             f"{result['untraced_us_per_call']:.1f} µs per call; {result['steps_per_round']} timed steps per row "
             f"per round after {result['warmup_steps']} untimed)", "",
             "| row | step (ms) | × untraced | × untraced, rounds' p25–p75 | added µs / module call (fw+bw) "
             "| × the floor's added |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in result["variants"].items():
        versus = _num(row.get("vs_floor_added"), 2, "×") if name in (STEADY, OFF_BETWEEN, PER_STEP) else ""
        if name == PER_STEP and row.get("vs_own_floor_added") is not None:
            versus += f" ({row['vs_own_floor_added']:.2f}× the per-step floor's)"
        if row.get("vs_ModuleTracker_added") is not None:
            versus += f" ({row['vs_ModuleTracker_added']:.2f}× torch ModuleTracker's)"
        lines.append(f"| {name} | {row['step_ms']:.2f} | {row['ratio']:.3f} | {row['ratio_p25']:.3f}–"
                     f"{row['ratio_p75']:.3f} | {row['added_us_per_call']:.2f} | {versus} |")
    lines.append("")
    return lines


def breakdown_markdown(workloads: dict[str, Any]) -> list[str]:
    lines = ["**Where the time goes** (µs per module call added over the untraced step of the same round, "
             "medians over rounds; forward includes the loss; the boundary is what the row wraps a step in; "
             "the steady Timeline's stop(), its resolve and write, is spread over the steps it recorded)", "",
             "| workload | row | forward | of it, beyond the floor's | backward | step boundary | sum "
             "| step, measured | resolve + write at the end | step + resolve + write |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for workload, result in workloads.items():
        for name in (FLOOR, STEADY, OFF_BETWEEN, PER_STEP, PER_STEP_FLOOR):
            if name not in result["breakdown"]:  # (a JSON from before the row)
                continue
            part = result["breakdown"][name]
            total = part["forward_us_per_call"] + part["backward_us_per_call"] + part["boundary_us_per_call"]
            beyond = _num(part.get("forward_beyond_floor_us_per_call"))
            if name == STEADY:
                resolve = part["resolve_write_us_per_call"]
                write, with_write = _num(resolve), _num(part["step_us_per_call"] + resolve)
            elif name in (PER_STEP, PER_STEP_FLOOR):
                write, with_write = "(in the boundary)", _num(part["step_us_per_call"])
            else:
                write, with_write = "–", _num(part["step_us_per_call"])
            lines.append(f"| {workload} | {name} | {part['forward_us_per_call']:.2f} | {beyond} "
                         f"| {part['backward_us_per_call']:.2f} | {part['boundary_us_per_call']:.2f} | {total:.2f} "
                         f"| {part['step_us_per_call']:.2f} | {write} | {with_write} |")
    lines += ["", "The same fixed costs in ms:", "",
              "| workload | `with tl.step():` enter + exit, per step | steady Timeline: start() | stop() "
              "(resolve + write) | steps it recorded | stop() per step | per-step Timeline: start + stop + write, "
              "per step |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for workload, result in workloads.items():
        steady, per_step = result["breakdown"][STEADY], result["breakdown"][PER_STEP]
        lines.append(f"| {workload} | {steady['boundary_ms_per_step']:.3f} | {steady['start_ms']:.3f} "
                     f"| {steady['stop_ms']:.2f} | {steady['steps_per_timeline']} "
                     f"| {steady['resolve_write_ms_per_step']:.3f} | {per_step['boundary_ms_per_step']:.2f} |")
    lines.append("")
    return lines


def goals_markdown(workloads: dict[str, Any]) -> list[str]:
    lines = ["**Issue 26's goals** (medians of interleaved rounds)", "",
             "| workload | row | goal | measured | rounds within the goal | on the other clock "
             "| its floor alone, × untraced |",
             "|---|---|---|---:|---:|---:|---|"]
    any_goal = False
    for workload, name, figure, limit in GOALS:
        if workload not in workloads:
            continue
        any_goal = True
        result = workloads[workload]
        row = result["variants"][name]
        if figure == "ratio":
            goal, value = f"≤ {limit}× untraced", row["ratio"]
            per_round = row["per_round_ratios"]
        else:
            goal, value = f"added per call ≤ {limit}× the floor's", row["vs_floor_added"]
            per_round = [t / f for t, f in zip(row["per_round_added_us_per_call"],
                                               result["variants"][FLOOR]["per_round_added_us_per_call"]) if f > 0]
        within = sum(1 for r in per_round if r <= limit)
        verdict = "met" if value is not None and value <= limit else "**not met**"
        other = result["other_clock"]
        other_value = other["variants"][name]["ratio" if figure == "ratio" else "vs_floor_added"]
        floor = result["variants"].get(FLOOR_OF[name])  # (None: a JSON from before the per-step floor)
        floor_text = "–" if floor is None else f"{floor['ratio']:.3f}× ({FLOOR_OF[name]})"
        lines.append(f"| {workload} | {name} | {goal} | {_num(value, 3, '×')} ({verdict}) "
                     f"| {within} of {len(row['per_round_ratios'])} "
                     f"| {_num(other_value, 3, '×')} ({other['clock']}) | {floor_text} |")
    lines.append("")
    return lines if any_goal else []


def markdown(results: dict[str, Any]) -> str:
    workloads = results["workloads"]
    if workloads:
        clock = {"cpu": "the process's CPU time", "wall": "wall time"}[results["clock"]]
        lines = [f"Machine: {results['machine']}; load average {results['load_average_at_start'][0]:.1f} at the "
                 f"start, {results['load_average_at_end'][0]:.1f} at the end; medians of {results['reps']} "
                 f"interleaved rounds (ratios and added time taken within each round); times are {clock}.", ""]
        lines += goals_markdown(workloads)
        for workload, result in workloads.items():
            lines += workload_markdown(workload, result)
        lines += breakdown_markdown(workloads)
    else:
        lines = [f"Machine: {results['machine']}.", ""]
    if "integrations" in results:
        lines.append(integrations_markdown(results["integrations"]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="interleaved rounds of the workloads' rows")
    parser.add_argument("--workloads", nargs="*", default=DEFAULT_WORKLOADS,
                        help=f"of {', '.join(WORKLOADS)} (none: the integrations' table only)")
    parser.add_argument("--steps-per-round", type=int, default=None,
                        help="timed steps per row per round (default: about 0.12 s of untraced steps, 3 to 20)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps before each row's block")
    parser.add_argument("--no-torch-rows", action="store_true",
                        help="leave out torch's ModuleTracker, ModTracker and torch.profiler rows")
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu",
                        help="the workloads' tables: the process's CPU time (default) or wall time; "
                             "the JSON holds both")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (and OMP_NUM_THREADS of the record script's processes)")
    parser.add_argument("--integrations", nargs="*", default=list(INTEGRATIONS), choices=list(INTEGRATIONS),
                        help="the integrations' rows (none: --no-integrations)")
    parser.add_argument("--no-integrations", action="store_const", const=[], dest="integrations")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the integrations' rows")
    parser.add_argument("--steps", type=int, default=15, help="training steps per integration run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="measure nothing: write the tables of an overhead.json again (to --out)")
    args = parser.parse_args()
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        save("overhead", saved, markdown(saved), args.out)
        return 0
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    results: dict[str, Any] = {"machine": machine(), "reps": args.reps, "clock": args.clock, "workloads": {},
                               "load_average_at_start": os.getloadavg()}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads:
            results["workloads"][workload] = measure(workload, args.reps, Path(tmp), args.steps_per_round,
                                                     args.warmup_steps, not args.no_torch_rows, args.clock)
            print(f"measured {workload} ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
        if args.integrations:
            rows = {}
            for name in args.integrations:
                rows[name] = measure_integration(name, args.rounds, args.steps, Path(tmp))
                print(f"measured {name} ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
            results["integrations"] = {"rounds": args.rounds, "steps": args.steps, "rows": rows}
    results["load_average_at_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - began
    save("overhead", results, markdown(results), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
