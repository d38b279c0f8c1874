"""An oracle for backward spans that shares nothing with modtimeline's recorder.

During forward, a ``TorchFunctionMode`` gives every autograd node that a torch function
returns to the innermost module call running at that moment (the oracle's own module
hooks keep that stack). During backward, Python pre- and post-hooks on every one of
those nodes stamp when it started and finished. A module call's autograd work is the
set of nodes its forward (or its recompute, under activation checkpointing) created,
its children's included.

Checks compare by *order*, not by amounts of time, so they hold on a loaded machine
(on CPU autograd runs the nodes one after another on the thread that called backward):

* the span covers the work: it begins before the first of the call's nodes has
  finished and ends after the last of them has started;
* the span is not longer than the work: it begins after the node run just before the
  call's first node has finished, and ends before the node run just after the call's
  last node has started (nodes of other calls, and of no call, are "outside" nodes);
* a call that created no node has no backward span.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .trace_checks import spans


@dataclass
class OracleCall:
    fqn: str
    kind: str  # "forward" or "recompute"
    parent: OracleCall | None
    nodes: list[Any] = field(default_factory=list)
    children: list[OracleCall] = field(default_factory=list)

    def all_nodes(self) -> list[Any]:
        found = list(self.nodes)
        for child in self.children:
            found.extend(child.all_nodes())
        return found


class AutogradOracle(TorchFunctionMode):
    def __init__(self, root: torch.nn.Module) -> None:
        super().__init__()
        prefix = type(root).__name__
        self.names = {id(m): (f"{prefix}.{n}" if n else prefix) for n, m in root.named_modules()}
        self.calls: list[OracleCall] = []
        self.stack: list[OracleCall] = []
        self.owner: dict[Any, OracleCall | None] = {}
        self.started: dict[Any, int] = {}
        self.finished: dict[Any, int] = {}
        self._handles: list[Any] = []

    # module calls
    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        name = self.names.get(id(module))
        if name is None:
            return
        kind = "recompute" if torch._C._current_graph_task_id() != -1 else "forward"
        call = OracleCall(name, kind, self.stack[-1] if self.stack else None)
        if call.parent is not None:
            call.parent.children.append(call)
        self.calls.append(call)
        self.stack.append(call)

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.stack and self.stack[-1].fqn == self.names.get(id(module)):
            self.stack.pop()

    # nodes
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                self._own(value.grad_fn)
        return out

    def _own(self, node: Any) -> None:
        if node in self.owner:
            return
        call = self.stack[-1] if self.stack else None
        self.owner[node] = call
        if call is not None:
            call.nodes.append(node)
        self._handles.append(node.register_prehook(lambda grads, node=node: self._start(node)))
        self._handles.append(node.register_hook(lambda grads_in, grads_out, node=node: self._finish(node)))

    def _start(self, node: Any) -> None:
        self.started.setdefault(node, time.perf_counter_ns())

    def _finish(self, node: Any) -> None:
        self.finished.setdefault(node, time.perf_counter_ns())

    def __enter__(self) -> AutogradOracle:
        self._handles += [register_module_forward_pre_hook(self._pre),
                          register_module_forward_hook(self._post, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def ran(self, nodes: list[Any]) -> list[Any]:
        return [n for n in nodes if n in self.started and n in self.finished]


def check_backward_spans(oracle: AutogradOracle, trace: dict, step: int) -> dict[str, int]:
    """Check every module call of ``step`` against the oracle; returns counts of what was
    checked. Raises AssertionError naming the first call that fails."""
    base_ns = trace["metadata"]["base_ns"]
    events = [e for e in spans(trace) if e["args"].get("step") == step]
    # The k-th forward (or recompute) call of each FQN in the trace and in the oracle.
    trace_calls: dict[tuple[str, str], list[int]] = defaultdict(list)
    for e in sorted(events, key=lambda e: e["ts"]):
        if e["cat"] in ("forward", "recompute"):
            trace_calls[e["cat"], e["name"]].append(e["args"]["call"])
    backward = {e["args"]["call"]: e for e in events if e["cat"] == "backward"}

    outside_order = sorted((oracle.started[n], oracle.finished[n], n) for n in oracle.ran(list(oracle.owner)))
    counts = {"calls": 0, "with_work": 0, "without_work": 0}
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for call in oracle.calls:
        key = (call.kind, call.fqn)
        k = seen[key]
        seen[key] += 1
        trace_ids = trace_calls.get(key, [])
        assert k < len(trace_ids), f"{call.kind} call {k} of {call.fqn} is missing from the trace"
        span = backward.get(trace_ids[k])
        counts["calls"] += 1
        work = set(oracle.ran(call.all_nodes()))
        if not work:
            assert span is None, f"{call.fqn} ({call.kind} {k}) created no autograd work but has a backward span"
            counts["without_work"] += 1
            continue
        counts["with_work"] += 1
        assert span is not None, f"{call.fqn} ({call.kind} {k}): its nodes ran but it has no backward span"
        assert not span["args"].get("approximate"), f"{call.fqn}: span flagged approximate"
        begin = base_ns + round(span["ts"] * 1000)
        end = begin + round(span["dur"] * 1000)
        first_start = min(oracle.started[n] for n in work)
        first_end = min(oracle.finished[n] for n in work)
        last_start = max(oracle.started[n] for n in work)
        last_end = max(oracle.finished[n] for n in work)
        # (1 µs of slack: the trace stores whole microseconds from base_ns.)
        assert begin <= first_end + 1000, f"{call.fqn}: backward span begins after its first node finished"
        assert end + 1000 >= last_start, f"{call.fqn}: backward span ends before its last node started"
        before = [f for s, f, n in outside_order if n not in work and f <= first_start]
        after = [s for s, f, n in outside_order if n not in work and s >= last_end]
        if before:
            assert begin + 1000 >= max(before), (
                f"{call.fqn} ({call.kind} {k}): backward span begins {(max(before) - begin) / 1000:.0f} µs "
                "before the node run just ahead of its own work had finished")
        if after:
            assert end <= min(after) + 1000, (
                f"{call.fqn} ({call.kind} {k}): backward span ends {(end - min(after)) / 1000:.0f} µs "
                "after the node run just after its own work had started")
    return counts
