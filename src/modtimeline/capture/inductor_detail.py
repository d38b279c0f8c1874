"""Module spans inside inductor-compiled regions, measured from the kernels that ran
(``Timeline(compiled_detail=True)`` with the inductor backend).

Inductor fuses the submodules of a compiled region into kernels, so no hook (and no leaf
function: they do not compile under inductor) can mark their boundaries. Instead:

* **compile time** (``Provenance.install``, in place before the model's first compiled
  call, from ``Timeline.start()`` on): inductor's provenance tracking records, per kernel
  *call site*, the post-grad FX nodes fused into it (``"<kernel>:<debug handle>"`` ->
  node names), C++ kernels open a profiler range each (``cpp.enable_kernel_profile``), and
  a post-grad pass of ours, chained after the user's (torch 2.13: a list, run in order;
  2.11: one callable, wrapped), reads each graph's node -> module path
  (``nn_module_stack`` forward, ``fwd_nn_module_stack`` backward), its Dynamo compile id
  and phase, and holds the provenance dict (inductor swaps it out once the compile ends).
* **run time**: torch.profiler (Kineto, CPU activity; CUDA too on a GPU) records the
  Timeline's recorded steps only, the Timeline's own profiler unless one is recording
  already. ``## Call CompiledFxGraph`` ranges are the graph calls (in ``CompiledFunction``
  forward, ``CompiledFunctionBackward`` backward, under ``Torch-Compiled Region: <id>``);
  their direct children are the kernels in call order, and the k-th child named X is the
  k-th call site named X.
* **attribution**: a call site's nodes -> their module paths -> the deepest common
  ancestor (view-like nodes left out unless nothing else is). A kernel fused across
  several modules is their ancestor's, and that span says ``fused``. The owner (the module
  whose compiled call ran the graph: a ``torch.compile`` wrapper, a module compiled in
  place, each block compiled on its own) is the innermost compiled span of the same phase
  whose time holds the graph call, on the host clock the Timeline's clock marks pair with
  the profiler's.

Spans: per graph call, the kernels in order, each with its module path under the owner;
a run of consecutive kernels within one module is one span of that module (and of each
ancestor up to the owner), so spans nest, and sit *inside the owner's compiled span, on
its track*: summary's self time of the owner is then what no submodule accounts for. On
the CPU a span lasts from its first kernel's start to its last kernel's end. On a GPU
(kernels linked to their launch by correlation id; written from torch's source, run here
only on stand-in events) the spans are the device kernels' times, on a track of their own
per device (``cuda:N compiled kernels``).
"""

from __future__ import annotations

import os
import re
import warnings
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..analysis.profiler import Bracket, ClockFit, fit_clock, paired_brackets
from ..format import (BACKWARD, COMPILED, FORWARD, FUSED, GPU_TRACK_PREFIX, PROFILER_CLOCK_MARK,
                      PROFILER_CLOCK_MARK_AFTER, Track, TraceData)

__all__ = ["InductorDetail", "Provenance", "PROVENANCE", "GraphCall", "KernelCall", "graph_calls", "add_detail_spans"]

# Ops that move no data: fused into a kernel they say nothing of who computed it.
_VIEW_OPS = frozenset({
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "squeeze", "unsqueeze", "select",
    "slice", "alias", "as_strided", "getitem", "split", "split_with_sizes", "unbind", "view_as", "clone",
    "convert_element_type", "_to_copy", "contiguous",
})
_ROOT_EXPR = re.compile(r"^[LG]\[[^\]]*\](?:\[[^\]]*\])*")
_COMPONENT = re.compile(r"\.([A-Za-z0-9_]+)|\[(\d+)\]|\[['\"]([^'\"]+)['\"]\]|\._modules\[['\"]([^'\"]+)['\"]\]")
_CPP_PREFIX = re.compile(r"^graph_\d+_")
CALL_RANGE = "## Call CompiledFxGraph"
REGION = "Torch-Compiled Region: "
FORWARD_FUNCTION = "CompiledFunction"
BACKWARD_FUNCTION = "CompiledFunctionBackward"
# Call numbers of kernel-measured spans: far above the hooks' and the leaves' own.
FIRST_CALL = 1 << 44
# Tracks of device-measured spans: cuda:N compiled kernels (tid GPU_KERNEL_TRACK_BASE + N).
GPU_KERNEL_TRACK_BASE = 5000


def module_path(dynamo_path: str) -> tuple[str, ...]:
    """``L['self'].blocks.0.mlp`` / ``L['args'][0].model.layers[0]`` -> ('blocks', '0', ...):
    the path under the compiled callable's own module (its leading source stripped)."""
    match = _ROOT_EXPR.match(dynamo_path)
    rest = dynamo_path[match.end():] if match else dynamo_path
    return tuple(a or b or c or d for a, b, c, d in _COMPONENT.findall(rest))


def event_name(kernel: str) -> str:
    """A provenance kernel name as the profiler names its range."""
    if kernel.startswith("extern_kernels."):
        return "aten::" + kernel.split(".", 1)[1]
    if kernel.startswith("torch.ops."):
        parts = kernel.split(".")  # torch.ops.<ns>.<op>.<overload>
        return f"{parts[2]}::{parts[3]}" if len(parts) >= 4 else kernel
    return kernel


def common_prefix(paths: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    if not paths:
        return ()
    first = paths[0]
    n = len(first)
    for path in paths[1:]:
        n = min(n, len(path))
        for i in range(n):
            if path[i] != first[i]:
                n = i
                break
    return first[:n]


@dataclass
class CallSite:
    event: str  # the profiler's name for it
    path: tuple[str, ...]  # module path under the owner (deepest common ancestor)
    fused: tuple[tuple[str, ...], ...]  # the distinct module paths it computed, when more than one


@dataclass
class GraphRecord:
    """One post-grad graph as our pass saw it."""

    compile_id: str
    phase: str  # forward | backward
    nodes: dict[str, tuple[tuple[str, ...] | None, bool]]  # node -> (module path, view-like)
    provenance: dict[str, Any]  # inductor's dict, held (it is swapped out after the compile)
    start: int  # the debug-handle counter before codegen
    end: int | None = None
    sites: list[CallSite] | None = None
    sites_of: int = -1  # the size of ``provenance`` that ``sites`` was read from

    def call_sites(self) -> list[CallSite]:
        if self.sites is not None and (self.end is not None or self.sites_of == len(self.provenance)):
            return self.sites
        size = len(self.provenance)
        entries = []
        for key, names in list(self.provenance.items()):
            kernel, _, handle = str(key).rpartition(":")
            try:
                number = int(handle)
            except ValueError:
                continue
            if number > self.start and (self.end is None or number <= self.end):
                entries.append((number, kernel, names))
        entries.sort(key=lambda entry: entry[0])
        sites = []
        for _, kernel, names in entries:
            info = [self.nodes.get(name) for name in names]
            known = [(path, view) for path, view in (i for i in info if i is not None) if path is not None]
            compute = [path for path, view in known if not view]
            every = [path for path, _ in known]
            path = common_prefix(compute) if compute else common_prefix(every)
            distinct = tuple(sorted(set(compute or every)))
            sites.append(CallSite(event_name(kernel), path, distinct if len(distinct) > 1 else ()))
        # (the last graph of a dict may still grow, a lazy backward's: read again once it has)
        self.sites, self.sites_of = sites, size
        return sites


class Provenance:
    """Inductor's provenance tracking and our post-grad pass, installed while a
    ``compiled_detail`` Timeline is started (nested Timelines count), and what that pass
    recorded (kept for the process: a model compiled under one Timeline shows its detail
    under the next)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], GraphRecord] = {}
        self._order: list[GraphRecord] = []
        self._users = 0
        self._saved: dict[str, Any] = {}  # the settings before install
        self._ours: dict[str, Any] = {}  # the values install gave them
        self.failures = 0

    @property
    def installed(self) -> bool:
        return self._users > 0

    def install(self) -> bool:
        """Install (or count one more user); False where this torch has no inductor, or
        its config could not be set (then nothing of it is left set)."""
        if self._users:
            self._users += 1
            return True
        try:
            import torch._inductor.config as config
        except Exception:
            return False
        saved = {name: _get(config, name) for name in _SETTINGS}
        ours = {"trace.provenance_tracking_level": max(1, int(saved["trace.provenance_tracking_level"] or 0)),
                "cpp.enable_kernel_profile": True,
                "post_grad_custom_post_pass": _chain(saved["post_grad_custom_post_pass"], self._post_pass)}
        done: list[str] = []
        try:
            for name in _SETTINGS:
                _set(config, name, ours[name])
                done.append(name)
        except Exception as error:
            for name in reversed(done):
                _set(config, name, saved[name])
            warnings.warn(f"modtimeline: compiled_detail could not set inductor's config ({error!r}): no kernel "
                          "detail", RuntimeWarning, stacklevel=3)
            return False
        self._saved, self._ours = saved, ours
        self._users = 1
        return True

    def uninstall(self) -> None:
        """One user fewer; the last one gives back each setting that still holds the value
        ``install`` gave it (one the user changed meanwhile stays theirs)."""
        if not self._users:
            return
        self._users -= 1
        if self._users:
            return
        import torch._inductor.config as config

        for name in _SETTINGS:
            try:
                current = _get(config, name)
                ours = self._ours[name]
                if current is ours or current == ours or (name == "post_grad_custom_post_pass"
                                                          and _is_ours(current, self._post_pass)):
                    _set(config, name, self._saved[name])
            except Exception:  # (the others are still given back)
                pass
        self._saved, self._ours = {}, {}

    def _post_pass(self, graph: Any) -> None:
        """Once per post-grad graph (forward, backward, inference); never changes it."""
        try:
            self._record(graph)
        except Exception as error:  # never break the user's compile
            self.failures += 1
            warnings.warn(f"modtimeline: compiled_detail could not read an inductor graph ({error!r}): its "
                          "kernels show under the compiled module", RuntimeWarning, stacklevel=2)

    def _record(self, graph: Any) -> None:
        import torch
        import torch._inductor.debug as inductor_debug

        compile_id = str(torch._guards.CompileContext.current_compile_id())
        backward = any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes)
        nodes: dict[str, tuple[tuple[str, ...] | None, bool]] = {}
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            forward_stack, backward_stack = node.meta.get("nn_module_stack"), node.meta.get("fwd_nn_module_stack")
            stack = (backward_stack or forward_stack) if backward else (forward_stack or backward_stack)
            path = None
            if stack:
                last = list(stack.values())[-1]
                path = module_path(last[0] if isinstance(last, tuple) else str(last))
            op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            nodes[node.name] = (path, op in _VIEW_OPS)
        record = GraphRecord(compile_id, "backward" if backward else "forward", nodes,
                             inductor_debug._inductor_triton_kernel_to_post_grad_node_info,
                             int(inductor_debug._inductor_kernel_provenance_debug_handle))
        for previous in reversed(self._order):  # the graph before it in the same dict ends here
            if previous.provenance is record.provenance and previous.end is None:
                previous.end = record.start
                break
        self._order.append(record)
        del self._order[:-256]  # (bounded: old graphs are found by their key)
        self.records[(record.compile_id, record.phase)] = record


# The inductor config settings ``Provenance.install`` sets, in order (dotted: config.trace.X).
_SETTINGS = ("trace.provenance_tracking_level", "cpp.enable_kernel_profile", "post_grad_custom_post_pass")


def _get(config: Any, name: str) -> Any:
    owner, _, leaf = name.rpartition(".")
    return getattr(getattr(config, owner) if owner else config, leaf)


def _set(config: Any, name: str, value: Any) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(getattr(config, owner) if owner else config, leaf, value)


def _chain(user: Any, ours: Any) -> Any:
    """The user's post-grad pass(es), then ours (2.13: a list; 2.11: one callable)."""
    try:
        import torch._inductor.custom_graph_pass as custom

        lists = hasattr(custom, "get_custom_graph_passes")
    except Exception:
        lists = False
    if lists:
        passes = [] if user is None else list(user) if isinstance(user, (list, tuple)) else [user]
        return [*passes, ours]

    def chained(graph: Any) -> None:
        if user is not None:
            user(graph)
        ours(graph)

    chained.modtimeline_pass = ours  # type: ignore[attr-defined]
    return chained


def _is_ours(value: Any, ours: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and value[-1] == ours
    return getattr(value, "modtimeline_pass", None) == ours


PROVENANCE = Provenance()


# ------------------------------------------------------------------ the profile
@dataclass
class KernelCall:
    start: int  # profiler ns (device time on a GPU)
    end: int
    path: tuple[str, ...] | None  # None: matched no call site
    fused: tuple[tuple[str, ...], ...] = ()
    device: int | None = None  # the GPU it ran on


@dataclass
class GraphCall:
    phase: str
    compile_id: str | None
    start: int  # profiler ns of the Call range
    end: int
    kernels: list[KernelCall]
    forward_start: int | None = None  # backward: its forward's Call range start (the owner fallback)


@dataclass
class Profile:
    """What one profiler run says: the graph calls and the clock marks."""

    calls: list[GraphCall] = field(default_factory=list)
    brackets: list[Bracket] = field(default_factory=list)
    unknown_graphs: int = 0  # graph calls with no provenance record (compiled before the detail)


_CPU_TYPE: int | None = None
_MARK_STEM = os.path.commonprefix([PROFILER_CLOCK_MARK, PROFILER_CLOCK_MARK_AFTER])


def _cpu_type() -> int:
    global _CPU_TYPE
    if _CPU_TYPE is None:
        import torch

        _CPU_TYPE = torch.autograd.DeviceType.CPU.value
    return _CPU_TYPE


class _Events:
    """The CPU events of a profile as columns (index i: one event), nested by time on
    their thread: ``parent[i]`` (-1: none), and the direct children of each graph call.
    Flat lists of numbers, no object per event: a small step's profile holds a few
    hundred events, and reading them is paid at every profiled step."""

    __slots__ = ("raws", "names", "starts", "ends", "threads", "parent", "children", "calls")

    def __init__(self, raws: list[Any]) -> None:
        self.raws = raws
        self.names: list[str] = [raw.name() for raw in raws]
        self.starts: list[int] = [raw.start_ns() for raw in raws]
        self.ends: list[int] = [raw.end_ns() for raw in raws]
        self.threads: list[int] = [raw.start_thread_id() for raw in raws]
        self.parent: list[int] = [-1] * len(raws)
        self.children: dict[int, list[int]] = {}  # graph call -> its direct children, in time order
        starts, ends, parent = self.starts, self.ends, self.parent
        # The graph calls (``## Call CompiledFxGraph ... ##`` ranges), by thread and start.
        self.calls = sorted((i for i, name in enumerate(self.names) if name.startswith(CALL_RANGE)),
                            key=lambda i: (self.threads[i], starts[i]))
        calls = set(self.calls)
        stack: list[int] = []
        thread = None
        for thread_id, start, negative_end, i in sorted(zip(self.threads, starts, [-e for e in ends],
                                                            range(len(raws)))):
            if thread_id != thread:
                stack, thread = [], thread_id
            while stack and ends[stack[-1]] <= start:
                stack.pop()
            if stack:
                above = stack[-1]
                parent[i] = above
                if above in calls:
                    self.children.setdefault(above, []).append(i)
            stack.append(i)

    def enclosing(self, i: int, names: tuple[str, ...]) -> int:
        """The nearest ancestor named one of ``names``, or -1."""
        i = self.parent[i]
        while i >= 0:
            if self.names[i] in names:
                return i
            i = self.parent[i]
        return -1

    def compile_id(self, i: int) -> str | None:
        i = self.parent[i]
        while i >= 0:
            if self.names[i].startswith(REGION):
                return self.names[i][len(REGION):]
            i = self.parent[i]
        return None


def graph_calls(raw_events: Iterable[Any], provenance: Provenance = PROVENANCE, cpu_only: bool = False) -> Profile:
    """The graph calls of a finished profile's raw events
    (``prof.profiler.kineto_results.events()``: building torch's FunctionEvent tree costs
    ~20x more), their kernels matched to call sites, and the clock marks. ``cpu_only``:
    the profile recorded CPU activity alone (no event's device is asked)."""
    cpu: list[Any] = []
    device: list[Any] = []
    if cpu_only:
        cpu = list(raw_events)
    else:
        cpu_type = _cpu_type()
        for raw in raw_events:
            (cpu if raw.device_type().value == cpu_type else device).append(raw)
    events = _Events(cpu)
    names, starts, ends = events.names, events.starts, events.ends
    profile = Profile(brackets=_brackets(events))
    device_kernels = _device_kernels(events, device) if device else None
    functions = (FORWARD_FUNCTION, BACKWARD_FUNCTION)
    calls = events.calls
    enclosing = {call: events.enclosing(call, functions) for call in calls}
    forwards: dict[tuple[int, int], tuple[str | None, int]] = {}  # (thread, seq) -> (compile id, Call start)
    for call in calls:  # forwards first: their backwards pair with them
        function = enclosing[call]
        if function >= 0 and names[function] == FORWARD_FUNCTION:
            seq = cpu[function].sequence_nr()
            if seq >= 0:
                forwards[(events.threads[function], seq)] = (events.compile_id(call), starts[call])
    for call in calls:
        function = enclosing[call]
        phase, forward_start = "forward", None
        if function >= 0 and names[function] == BACKWARD_FUNCTION:
            phase = "backward"
            raw = cpu[function]
            compile_id, forward_start = forwards.get((raw.fwd_thread_id(), raw.sequence_nr()), (None, None))
        else:
            compile_id = events.compile_id(call)
        children = events.children.get(call, [])
        record = provenance.records.get((compile_id, phase)) if compile_id is not None else None
        if record is None:
            record = _by_sequence(provenance, [names[child] for child in children], phase)
        if record is None:
            profile.unknown_graphs += 1
        queues: dict[str, deque[CallSite]] = defaultdict(deque)
        for site in record.call_sites() if record is not None else ():
            queues[site.event].append(site)
        kernels = []
        for child in children:
            queue = queues.get(_CPP_PREFIX.sub("", names[child]))
            matched: CallSite | None = queue.popleft() if queue else None
            path, fused = (matched.path, matched.fused) if matched is not None else (None, ())
            if device_kernels is None:
                kernels.append(KernelCall(starts[child], ends[child], path, fused))
            else:
                for start, end, index in device_kernels.get(child, ()):
                    kernels.append(KernelCall(start, end, path, fused, index))
        profile.calls.append(GraphCall(phase, compile_id, starts[call], ends[call], kernels, forward_start))
    return profile


def _by_sequence(provenance: Provenance, children: list[str], phase: str) -> GraphRecord | None:
    """No compile id (a backward whose forward ran before the profile): the latest graph
    whose call sites have the names the events have, in that order."""
    names = [_CPP_PREFIX.sub("", child) for child in children]
    for record in reversed(provenance._order):
        if record.phase != phase:
            continue
        sites = [site.event for site in record.call_sites()]
        known = set(sites)
        if sites and sites == [name for name in names if name in known]:
            return record
    return None


def _device_kernels(events: _Events, device: list[Any]) -> dict[int, list[tuple[int, int, int]]]:
    """Direct child of a graph call (its index) -> [(start, end, device index)] of the
    device kernels it launched: each is linked by correlation id to the CPU op that was
    innermost at the launch (a triton range, ``aten::mm`` for cuBLAS), walked up to the
    Call's child."""
    by_correlation: dict[int, int] = {}
    for i, raw in enumerate(events.raws):
        correlation = raw.correlation_id()
        if correlation:
            by_correlation[correlation] = i
    names, parent = events.names, events.parent
    out: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for kernel in device:
        event = by_correlation.get(kernel.linked_correlation_id(), -1)
        while event >= 0 and parent[event] >= 0 and not names[parent[event]].startswith(CALL_RANGE):
            event = parent[event]
        if event >= 0 and parent[event] >= 0:
            start = kernel.start_ns()
            index = kernel.device_index() if hasattr(kernel, "device_index") else 0
            out[event].append((start, start + kernel.duration_ns(), int(index)))
    return out


def _brackets(events: _Events) -> list[Bracket]:
    """The Timeline's clock-mark pairs in the profile (see analysis/profiler.py)."""
    marks: dict[int, list[tuple[int, str, int, int]]] = defaultdict(list)
    for i, name in enumerate(events.names):
        if not name.startswith(_MARK_STEM):
            continue
        for prefix in (PROFILER_CLOCK_MARK_AFTER, PROFILER_CLOCK_MARK):
            if name.startswith(prefix):
                try:
                    marks[events.threads[i]].append((events.starts[i], prefix, int(name[len(prefix):]),
                                                     events.ends[i]))
                except ValueError:
                    pass
                break
    return paired_brackets(marks.values())


# ------------------------------------------------------------------ the spans
@dataclass
class DetailSummary:
    kernel_ns: int = 0
    attributed_ns: int = 0
    graph_calls: int = 0
    placed_calls: int = 0
    spans: int = 0
    fused: dict[str, set[str]] = field(default_factory=dict)  # FQN -> the modules fused into its kernels

    def to_json(self, clock: ClockFit | None, unknown: int) -> dict[str, Any]:
        return {
            "source": "inductor provenance + torch.profiler kernels",
            "kernel_ns": self.kernel_ns,
            "attributed_ns": self.attributed_ns,
            "coverage": round(self.attributed_ns / self.kernel_ns, 4) if self.kernel_ns else None,
            "graph_calls": self.graph_calls,
            "graph_calls_placed": self.placed_calls,
            "graph_calls_without_provenance": unknown,
            "spans": self.spans,
            "clock_error_ns": clock.error_ns if clock is not None else None,
            "fused": {fqn: sorted(names) for fqn, names in sorted(self.fused.items())},
        }


def add_detail_spans(data: TraceData, profiles: Sequence[Profile], said: set[str] | None = None) -> DetailSummary:
    """Add the module spans measured from the kernels of ``profiles`` to ``data`` (its
    compiled spans are the owners), and ``metadata.compiled_detail``. Coverage: the share
    of the graphs' kernel time that a module (owner or submodule) took."""
    summary = DetailSummary()
    brackets = sorted((b for p in profiles for b in p.brackets), key=lambda b: b.ours)
    unknown = sum(p.unknown_graphs for p in profiles)
    calls = [call for p in profiles for call in p.calls]
    if not calls:
        return summary
    if not brackets:
        data.metadata["compiled_detail"] = {"problem": "the profile holds no clock marks: its graph calls could "
                                                       "not be put on the trace's clock"}
        return summary
    clock = fit_clock(brackets)
    spans = data.spans
    if len(spans):  # (a profile may hold more than this trace's window: a user's profiler)
        first, last = min(spans.begin), max(spans.end)
        calls = [call for call in calls if first <= _ours(call.start, clock) and _ours(call.end, clock) <= last]
    names = data.names
    name_index = {name: i for i, name in enumerate(names)}
    tolerance = (clock.error_ns or 0) + 2_000
    owners = _owner_index(data)
    counter = FIRST_CALL
    gpu_tracks: dict[int, int] = {}
    for call in calls:
        summary.graph_calls += 1
        total = sum(k.end - k.start for k in call.kernels)
        summary.kernel_ns += total
        begin, end = _ours(call.start, clock), _ours(call.end, clock)
        owner = _owner(owners, FORWARD if call.phase == "forward" else BACKWARD, begin, end, tolerance)
        if owner is None and call.phase == "backward" and call.forward_start is not None:
            forward_owner = _owner(owners, FORWARD, _ours(call.forward_start, clock),
                                   _ours(call.forward_start, clock), tolerance)
            if forward_owner is not None:  # the backward's owner is its forward's, on a track of its own
                owner = (forward_owner[0], -1, -1 << 62, 1 << 62, forward_owner[4])
        if owner is None:
            continue
        summary.placed_calls += 1
        fqn, track, low, high, step = owner
        summary.attributed_ns += sum(k.end - k.start for k in call.kernels if k.path is not None)
        for kernel in call.kernels:
            if kernel.fused and kernel.path is not None:
                here = ".".join((fqn, *kernel.path))
                summary.fused.setdefault(here, set()).update(".".join((fqn, *p)) for p in kernel.fused)
        by_device: dict[int | None, list[KernelCall]] = defaultdict(list)
        for kernel in call.kernels:
            if kernel.path is not None:
                by_device[kernel.device].append(kernel)
        for device, kernels in by_device.items():
            if device is None:
                if track < 0:
                    track = _track(data, 4000 + (1 if call.phase == "backward" else 0),
                                   f"compiled {call.phase} (kernels)")
                place_track, place_low, place_high = track, low, high
            else:
                place_track = gpu_tracks.get(device) or _track(data, GPU_KERNEL_TRACK_BASE + device,
                                                               f"{GPU_TRACK_PREFIX}:{device} compiled kernels")
                gpu_tracks[device] = place_track
                place_low, place_high = -1 << 62, 1 << 62
                kernels.sort(key=lambda k: k.start)
            category = FORWARD if call.phase == "forward" else BACKWARD
            # (outer spans first at equal times, with the smaller call number: readers nest by it)
            for path, first, last, fused in sorted(_runs(kernels), key=lambda run: (run[1], -run[2], len(run[0]))):
                name = ".".join((fqn, *path))
                index = name_index.get(name)
                if index is None:
                    index = name_index[name] = len(names)
                    names.append(name)
                span_begin = min(max(_ours(first, clock), place_low), place_high)
                span_end = max(min(_ours(last, clock), place_high), span_begin)
                flags = COMPILED | (FUSED if fused else 0)
                spans.append(place_track, span_begin, span_end, index, category, counter, step, flags)
                counter += 1
                summary.spans += 1
    if summary.spans:
        data.spans = data.spans.in_nesting_order()  # (writers take each track's spans in nesting order)
    data.metadata["compiled_detail"] = summary.to_json(clock, unknown)
    return summary


def _ours(profiler_ns: int, clock: ClockFit) -> int:
    """A profiler time on our clock (``profiler = ours + offset(ours)``; the offset moves
    slowly, so its value at the profiler time is close enough)."""
    return profiler_ns - clock.offset(profiler_ns - clock.points[0][1])


def _runs(kernels: list[KernelCall]) -> list[tuple[tuple[str, ...], int, int, bool]]:
    """(module path, first start, last end, fused) for every run of consecutive kernels
    inside one module, at every depth under the owner: the spans, nesting as the kernels'
    paths do. ``fused``: a kernel of the run's own (not a submodule's) computed several
    modules."""
    out: list[tuple[tuple[str, ...], int, int, bool]] = []
    open_: list[list[Any]] = []  # per depth: [path, start, end, fused]
    for kernel in kernels:
        path = kernel.path or ()
        depth = 0
        while depth < len(open_) and depth < len(path) and open_[depth][0] == path[: depth + 1]:
            depth += 1
        while len(open_) > depth:
            closed = open_.pop()
            out.append((closed[0], closed[1], closed[2], closed[3]))
        for d in range(depth, len(path)):
            open_.append([path[: d + 1], kernel.start, kernel.end, False])
        for entry in open_:
            entry[2] = max(entry[2], kernel.end)
        if kernel.fused and open_ and open_[-1][0] == path:
            open_[-1][3] = True
    while open_:
        closed = open_.pop()
        out.append((closed[0], closed[1], closed[2], closed[3]))
    return out


Owner = tuple[str, int, int, int, int]  # (FQN, track, begin, end, step)


def _owner_index(data: TraceData) -> dict[int, list[Owner]]:
    """Compiled spans by category: the spans a graph call can belong to."""
    spans = data.spans
    found: dict[int, list[Owner]] = defaultdict(list)
    for row in range(len(spans)):
        if spans.flags[row] & COMPILED and spans.category[row] in (FORWARD, BACKWARD) and spans.call[row] < FIRST_CALL:
            found[spans.category[row]].append((data.names[spans.name[row]], spans.track[row], spans.begin[row],
                                               spans.end[row], spans.step[row]))
    return found


def _owner(owners: dict[int, list[Owner]], category: int, begin: int, end: int, tolerance: int) -> Owner | None:
    """The innermost compiled span of ``category`` whose time holds [begin, end]."""
    best: Owner | None = None
    for owner in owners.get(category, ()):
        if owner[2] - tolerance <= begin and end <= owner[3] + tolerance:
            if best is None or owner[3] - owner[2] < best[3] - best[2]:
                best = owner
    return best


def _track(data: TraceData, tid: int, name: str) -> int:
    if not any(track.tid == tid for track in data.tracks):
        data.tracks.append(Track(tid, name))
    return tid


# Traces written while the user's profiler recorded, waiting for its events (at most).
PENDING_TRACES = 16


def _give_back(hold: list[bool]) -> None:
    """An InductorDetail was collected while it held an install of PROVENANCE."""
    if hold[0]:
        hold[0] = False
        try:
            PROVENANCE.uninstall()
        except Exception:
            pass


class InductorDetail:
    """The inductor part of one Timeline's ``compiled_detail``: provenance installed
    while it is started, torch.profiler running in its recorded steps (its own, unless a
    profiler records already), the graph calls of each profiled stretch kept until the
    window is written.

    With ``Timeline(profiler=prof)`` the Timeline runs no profiler of its own: ``prof``'s
    events exist only once it stops (its ``on_trace_ready``, at its exit or at the end of
    each of its scheduled cycles), usually after the Timeline wrote its trace. Each trace written
    meanwhile is kept and written again, with the detail in, when ``prof`` stops."""

    def __init__(self, user_profiler: Any = None, mark_clock: Callable[[], None] | None = None) -> None:
        self._user_profiler = user_profiler
        # (pairs our clock with the profiler's, as at every step boundary: also right after
        # our profiler starts and right before it stops, so every profile holds a pair)
        self._mark_clock = mark_clock
        self._installed = False
        self._profiler: Any = None
        self._cpu_only = True  # (our profiler records CPU activity alone)
        # Whether this detail holds an install of PROVENANCE: one dropped unstopped (its
        # Timeline's start() failed, say) gives it back when it is collected.
        self._hold = [False]
        weakref.finalize(self, _give_back, self._hold).atexit = False
        self._profiles: list[Profile] = []
        self._pending: list[tuple[TraceData, Any, str | None]] = []  # (data, path, format)
        self.problem: str | None = None
        if user_profiler is not None and hasattr(user_profiler, "on_trace_ready"):
            # torch.profiler calls on_trace_ready (looked up at each call) once the events of
            # a run (or of each scheduled cycle) are ready: ours first, then the user's.
            users = user_profiler.on_trace_ready

            def trace_ready(profiler: Any) -> None:
                self._user_profiler_stopped()
                if users is not None:
                    users(profiler)

            user_profiler.on_trace_ready = trace_ready

    def start(self) -> None:
        """Install inductor's provenance tracking and our pass (before the model's first
        compiled call). ``undo()`` (or ``stop()``) gives them back."""
        if not self._installed:
            self._installed = PROVENANCE.install()
            self._hold[0] = self._installed

    def stop(self) -> None:
        """Read what was profiled, then ``undo()``."""
        self.pause()
        self.undo()

    def undo(self) -> None:
        """Undo exactly what ``start()`` (and ``recording()``) did, and nothing more: our
        profiler, if one runs, stops unread; the inductor config settings ``start()`` made
        go back to what they were (a setting the user changed meanwhile stays theirs).
        Idempotent, and safe after a ``start()`` that failed or never ran: for a
        Timeline whose ``start()`` raised after this one's had run."""
        profiler, self._profiler = self._profiler, None
        if profiler is not None:
            try:
                profiler.__exit__(None, None, None)
            except Exception:
                pass
        if self._installed:
            self._installed = False
            self._hold[0] = False
            PROVENANCE.uninstall()

    def recording(self) -> None:
        """A recorded step (or a recording without steps) begins: profile it, once there
        are inductor graphs to attribute (the step that compiles them is not profiled)."""
        if self._profiler is not None or not PROVENANCE.records or not self._installed:
            return
        import torch

        if self._user_profiler is not None:
            return  # (the user's profiler is read when it stops)
        if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):
            if self._user_profiler is None:
                self.problem = ("a torch.profiler that is not the Timeline's (profiler=) was recording: the Timeline "
                                "ran none of its own, and no kernel detail was taken")
            return
        # torch.autograd.profiler.profile: the Kineto profile that torch.profiler.profile
        # wraps, without the wrapper's per-start work (~0.15 ms of a ~1.1 ms start and stop).
        cuda = (torch.cuda.is_available() and torch.cuda.is_initialized()
                and torch.profiler.ProfilerActivity.CUDA in torch.autograd._supported_activities())
        profiler = torch.autograd.profiler.profile(use_kineto=True, use_device="cuda" if cuda else None)
        profiler.__enter__()
        self._profiler, self._cpu_only = profiler, not cuda
        if self._mark_clock is not None:
            self._mark_clock()

    def pause(self) -> None:
        """Recording stops (between windows, or for good): read what was profiled."""
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return
        if self._mark_clock is not None:
            self._mark_clock()
        profiler.__exit__(None, None, None)
        self._take(profiler, ours=True)

    def _take(self, profiler: Any, ours: bool = False) -> None:
        """Read a stopped profiler's graph calls: ours (a torch.autograd.profiler.profile)
        or the user's (a torch.profiler.profile)."""
        try:
            results = profiler.kineto_results if ours else profiler.profiler.kineto_results
            self._profiles.append(graph_calls(results.events(), cpu_only=ours and self._cpu_only))
        except Exception as error:  # (never lose the trace for the detail)
            self.problem = f"could not read the profile: {type(error).__name__}: {error}"

    def add_to(self, data: TraceData) -> None:
        """Add the kernel-measured spans of the window to ``data`` (at write)."""
        self.pause()
        if self._user_profiler is not None:
            data.metadata["compiled_detail"] = {"pending": "added when the profiler passed as profiler= stops"}
            return
        add_detail_spans(data, self._profiles)
        if self.problem is not None:
            data.metadata.setdefault("compiled_detail", {})["problem"] = self.problem
        if PROVENANCE.failures:
            data.metadata.setdefault("compiled_detail", {})["graphs_unread"] = PROVENANCE.failures

    def written(self, data: TraceData, path: Any, format: str | None) -> None:
        """The Timeline wrote ``data`` to ``path``: with a user's profiler, it gets the
        detail when that profiler stops."""
        if self._user_profiler is not None:
            self._pending.append((data, path, format))
            del self._pending[:-PENDING_TRACES]

    def _user_profiler_stopped(self) -> None:
        from ..writers import write_trace

        self._profiles = []
        self._take(self._user_profiler)
        profiles, self._profiles = self._profiles, []
        waiting, self._pending = self._pending, []
        for data, path, format in waiting:
            try:
                metadata = dict(data.metadata)
                metadata.pop("compiled_detail", None)
                data.metadata = metadata
                found = add_detail_spans(data, profiles)
                if not found.graph_calls:  # (the profiler's cycle did not hold this window)
                    data.metadata["compiled_detail"] = {"pending": "added when the profiler passed as profiler= "
                                                                  "stops"}
                    self._pending.append((data, path, format))
                    continue
                if self.problem is not None:
                    data.metadata["compiled_detail"]["problem"] = self.problem
                write_trace(data, path, format)
            except Exception as error:  # (the trace as first written stays)
                warnings.warn(f"modtimeline: could not add the compiled detail to {path}: {error}", RuntimeWarning,
                              stacklevel=2)

    def retire(self) -> None:
        """A new window: what was profiled for the old one is dropped."""
        self._profiles = []
