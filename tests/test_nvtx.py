"""NVTX ranges (``Timeline(nvtx=...)``) through a stand-in for torch.cuda.nvtx on the CPU:
the calls made, their names, balanced start/end, and ranges that match the trace's spans."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import torch

from modtimeline import DeviceError, Timeline

from .models import Tree, train_step
from .trace_checks import load, spans

pytestmark = pytest.mark.twin


class StandInNvtx:
    """Records range_start/range_end as nvtxRangeStartA/End would, with times and threads."""

    def __init__(self) -> None:
        self.next_id = 1
        self.open: dict[int, tuple[str, int]] = {}
        self.ranges: list[tuple[str, int, int]] = []  # (message, start ns, end ns)
        self.threads: set[int] = set()

    def range_start(self, message: str) -> int:
        range_id = self.next_id
        self.next_id += 1
        self.open[range_id] = (message, time.perf_counter_ns())
        self.threads.add(threading.get_ident())
        return range_id

    def range_end(self, range_id: int) -> None:
        message, start = self.open.pop(range_id)  # KeyError: ended twice, or never started
        self.ranges.append((message, start, time.perf_counter_ns()))


def _recorded(tmp_path, model_step, steps=2):
    nvtx = StandInNvtx()
    path = tmp_path / "t.json"
    with Timeline(path, nvtx=nvtx) as timeline:
        for _ in range(steps):
            with timeline.step():
                model_step()
    return nvtx, load(path)


def test_one_range_per_span_named_by_fqn_and_balanced(tmp_path):
    model = Tree()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    nvtx, trace = _recorded(tmp_path, lambda: train_step(model, optimizer))
    assert not nvtx.open  # every range ended
    expected = Counter(e["name"] + {"forward": "", "backward": " backward", "recompute": " recompute"}[e["cat"]]
                       for e in spans(trace) if e["cat"] != "step")
    assert Counter(message for message, _, _ in nvtx.ranges) == expected


def test_ranges_cover_the_same_time_as_the_spans(tmp_path):
    model = Tree()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    nvtx, trace = _recorded(tmp_path, lambda: train_step(model, optimizer))
    base_us = trace["metadata"]["base_ns"] / 1000
    by_name: dict[str, list[tuple[float, float]]] = {}
    for e in spans(trace):
        if e["cat"] == "backward":
            by_name.setdefault(e["name"] + " backward", []).append((base_us + e["ts"], base_us + e["ts"] + e["dur"]))
    matched = 0
    for message, start, end in nvtx.ranges:
        if message not in by_name:
            continue
        # the range opens and closes in the callbacks of the very events the span is made
        # of: a few µs after each (the callback runs after the event is stamped)
        if any(abs(start / 1000 - b) < 200 and abs(end / 1000 - e) < 200 for b, e in by_name[message]):
            matched += 1
    total = sum(1 for message, _, _ in nvtx.ranges if message in by_name)
    assert total and matched / total >= 0.9, f"{matched} of {total}"


def test_a_real_model_gets_balanced_backward_ranges(tmp_path):
    pytest.importorskip("transformers")
    from .real_models import llama

    torch.manual_seed(0)
    model, step = llama()
    nvtx, trace = _recorded(tmp_path, lambda: step().backward(), steps=1)
    assert not nvtx.open
    backward = [m for m, _, _ in nvtx.ranges if m.endswith(" backward")]
    assert len(backward) == sum(1 for e in spans(trace) if e["cat"] == "backward")
    assert "LlamaForCausalLM.model.layers.0.self_attn backward" in backward


def test_nvtx_without_a_cuda_build_is_a_clear_error(tmp_path):
    if torch.version.cuda is not None:  # (a CUDA build has NVTX, with or without a GPU)
        pytest.skip("this torch has NVTX")
    with pytest.raises(DeviceError, match="nvtx=True needs NVTX"):
        Timeline(tmp_path / "t.json", nvtx=True)
