"""Tracer overhead per module call and per step: untraced vs torch's ModuleTracker, ModTracker,
torch.profiler(with_modules=True) and `with Timeline(path): step()` (file written); then
the ways in that need no Timeline in the user's code: the transformers and lightning
TimelineCallbacks and `modtimeline record`, each against the same training untraced.

Runs everything in one process, interleaved (every round runs each variant once, in a
fresh random order), and reports per-round ratios to the untraced step of the same
round, medians over rounds: this shared machine's speed swings by 30-50 % within
minutes, and a ratio taken within one round cancels that. Garbage is collected before
each timed run, so no variant pays for another's.

    python benchmarks/overhead.py [--reps 21] [--rounds 7] [--out benchmarks/results]
    python benchmarks/overhead.py --workloads             # the integrations' table only
    python benchmarks/overhead.py --no-integrations       # the workloads' tables only

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
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from report import machine, save

from modtimeline import ModuleTracker as OurTracker
from modtimeline import Timeline


def tiny_modules() -> tuple[nn.Module, Callable[[nn.Module], None]]:
    """200 x (Linear + ReLU): the per-call cost dominates."""
    layers: list[nn.Module] = []
    for _ in range(100):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    model = nn.Sequential(*layers)
    x = torch.randn(4, 16)

    def step(m: nn.Module) -> None:
        m(x).sum().backward()

    return model, step


def transformer() -> tuple[nn.Module, Callable[[nn.Module], None]]:
    """A 12-layer small transformer encoder, batch 8 x 64 tokens."""
    layer = nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=12, enable_nested_tensor=False)
    x = torch.randn(8, 64, 128)

    def step(m: nn.Module) -> None:
        m(x).sum().backward()

    return model, step


def cnn() -> tuple[nn.Module, Callable[[nn.Module], None]]:
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
    x = torch.randn(8, 3, 32, 32)

    def step(m: nn.Module) -> None:
        m(x).sum().backward()

    return model, step


def compiled_transformer() -> tuple[nn.Module, Callable[[nn.Module], None]]:
    """The transformer under torch.compile (inductor): a Timeline sees one call per step."""
    model, step = transformer()
    compiled = torch.compile(model)

    def compiled_step(m: nn.Module) -> None:
        step(compiled)

    return model, compiled_step


WORKLOADS = {"tiny-modules": tiny_modules, "transformer": transformer, "cnn": cnn,
             "transformer-compiled": compiled_transformer}


def module_calls(model: nn.Module, step: Callable[[nn.Module], None]) -> int:
    tracker, calls = _call_counter()
    with tracker:
        step(model)
    return calls()


def variants(trace_dir: Path) -> dict[str, Callable[[], contextlib.AbstractContextManager[object]]]:
    from torch.distributed._tools.mod_tracker import ModTracker
    from torch.utils.module_tracker import ModuleTracker

    def profiler() -> contextlib.AbstractContextManager[object]:
        return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_modules=True)

    return {
        "untraced": contextlib.nullcontext,
        "torch ModuleTracker": ModuleTracker,
        "torch ModTracker": ModTracker,
        "torch.profiler": profiler,
        "Timeline (file written)": lambda: Timeline(trace_dir / "bench.json"),
    }


def measure(workload: str, reps: int, trace_dir: Path) -> dict[str, object]:
    torch.manual_seed(0)
    model, step = WORKLOADS[workload]()
    step(model)  # (a compiled workload compiles here, outside every measurement)
    calls = max(module_calls(model, step), 1)
    contexts = variants(trace_dir)
    times: dict[str, list[float]] = {name: [] for name in contexts}
    order = random.Random(0)
    for rep in range(reps + 2):  # the first two rounds warm up
        names = list(contexts)
        order.shuffle(names)
        for name in names:
            make = contexts[name]
            model.zero_grad(set_to_none=True)
            # Each variant starts with no garbage left by the previous one (torch.profiler
            # leaves plenty, which the next variant's allocations would pay to collect).
            gc.collect()
            start = time.perf_counter()
            with make():
                step(model)
            elapsed = time.perf_counter() - start
            if rep >= 2:
                times[name].append(elapsed)
    base = statistics.median(times["untraced"])
    rows = {}
    for name, samples in times.items():
        # Within each round: this variant against the untraced step of the same round.
        ratios = [t / u for t, u in zip(samples, times["untraced"])]
        added = [(t - u) / calls * 1e6 for t, u in zip(samples, times["untraced"])]
        rows[name] = {
            "step_ms": statistics.median(samples) * 1e3,
            "ratio": statistics.median(ratios),
            "added_us_per_call": statistics.median(added),
        }
    tracker_added = rows["torch ModuleTracker"]["added_us_per_call"]
    rows["Timeline (file written)"]["vs_ModuleTracker_added"] = (
        rows["Timeline (file written)"]["added_us_per_call"] / tracker_added if tracker_added > 0 else None
    )
    return {"module_calls_per_step": calls, "untraced_us_per_call": base / calls * 1e6, "variants": rows}


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

    class StepClock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.marks, self.mark = _torch_step_clock()

        def on_step_begin(self, args: object, state: object, control: object, **kwargs: object) -> None:
            self.mark()

    def trainer(folder: Path, callbacks: list[object], max_steps: int) -> Trainer:
        args = TrainingArguments(output_dir=str(folder / "out"), max_steps=max_steps, per_device_train_batch_size=4,
                                 report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0, learning_rate=1e-4)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # (it prints the run's metrics at its end)
        return trainer

    def run(traced: bool, folder: Path) -> list[float]:
        clock = StepClock()
        callbacks: list[object] = [clock] + ([TimelineCallback(folder / "hf.json")] if traced else [])
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

    class LitBlocks(pl.LightningModule):  # type: ignore[misc]
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

    class StepClock(pl.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.marks, self.mark = _torch_step_clock()

        def on_train_batch_start(self, trainer: object, pl_module: object, batch: object, batch_idx: int) -> None:
            self.mark()

    def fit(folder: Path, callbacks: list[object], max_steps: int) -> None:
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


def markdown(results: dict[str, object]) -> str:
    if results["workloads"]:
        lines = [f"Machine: {results['machine']}; medians of {results['reps']} interleaved rounds (ratios and added "
                 "time taken within each round).", ""]
    else:
        lines = [f"Machine: {results['machine']}.", ""]
    for workload, result in results["workloads"].items():  # type: ignore[attr-defined]
        lines.append(f"**{workload}** ({result['module_calls_per_step']} module calls per step, "
                     f"untraced {result['untraced_us_per_call']:.1f} µs per call)")
        lines.append("")
        lines.append("| variant | step (ms) | × untraced | added µs / module call (fw+bw) |")
        lines.append("|---|---:|---:|---:|")
        for name, row in result["variants"].items():
            extra = ""
            if row.get("vs_ModuleTracker_added") is not None:
                extra = f" ({row['vs_ModuleTracker_added']:.2f}× ModuleTracker's)"
            lines.append(f"| {name} | {row['step_ms']:.2f} | {row['ratio']:.3f} | {row['added_us_per_call']:.2f}{extra} |")
        lines.append("")
    if "integrations" in results:
        lines.append(integrations_markdown(results["integrations"]))  # type: ignore[arg-type]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--integrations", nargs="*", default=list(INTEGRATIONS), choices=list(INTEGRATIONS),
                        help="the integrations' rows (none: --no-integrations)")
    parser.add_argument("--no-integrations", action="store_const", const=[], dest="integrations")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the integrations' rows")
    parser.add_argument("--steps", type=int, default=15, help="training steps per integration run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results: dict[str, object] = {"machine": machine(), "reps": args.reps, "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads:
            results["workloads"][workload] = measure(workload, args.reps, Path(tmp))  # type: ignore[index]
            print(f"measured {workload}", file=sys.stderr)
        if args.integrations:
            rows = {}
            for name in args.integrations:
                rows[name] = measure_integration(name, args.rounds, args.steps, Path(tmp))
                print(f"measured {name}", file=sys.stderr)
            results["integrations"] = {"rounds": args.rounds, "steps": args.steps, "rows": rows}
    save("overhead", results, markdown(results), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
