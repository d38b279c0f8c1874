"""Decode the Chrome JSON traces modtimeline writes (``.json``, and ``.json.gz`` once
``decoding.read_bytes`` has inflated it) into a ``TraceFile`` (see writers/chrome.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from ..errors import TraceFormatError
from ..format import FLOW_IN, FLOW_NONE, FLOW_OUT, NO_LAG, TOOL
from .decoding import (CATEGORY_INDEX, Processes, ReadLimits, TraceFile, checked_int, checked_metadata,
                       checked_microseconds, checked_name, span_flags)

# What a torch.profiler (Kineto) Chrome trace has that ours never do: its own top-level
# keys, and its event categories.
_PROFILER_KEYS = frozenset(("schemaVersion", "deviceProperties", "distributedInfo", "baseTimeNanoseconds",
                            "traceName", "record_shapes", "with_stack", "profile_memory"))
_PROFILER_CATEGORIES = frozenset(("cpu_op", "python_function", "user_annotation", "cuda_runtime", "cuda_driver",
                                  "kernel", "gpu_memcpy", "gpu_memset", "gpu_user_annotation", "ac2g",
                                  "cpu_instant_event"))


def is_profiler_trace(document: dict[str, Any]) -> bool:
    """A torch.profiler Chrome trace that holds no modtimeline spans (one that
    ``merge --profiler`` wrote is a modtimeline trace)."""
    metadata = document.get("metadata")
    if isinstance(metadata, dict) and metadata.get("tool") == TOOL:
        return False
    if _PROFILER_KEYS.intersection(document):
        return True
    events = document.get("traceEvents")
    return isinstance(events, list) and any(isinstance(e, dict) and e.get("cat") in _PROFILER_CATEGORIES
                                            for e in events[:1000])


def chrome_document(path: Path, raw: bytes, limits: ReadLimits) -> tuple[dict[str, Any], list[Any]]:
    """(metadata, trace events) of a modtimeline Chrome trace, checked."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise TraceFormatError(f"{path}: not valid JSON ({error.msg} at byte {error.pos}); truncated?") from None
    if not isinstance(document, dict) or not isinstance(document.get("traceEvents"), list):
        raise TraceFormatError(f"{path}: not a Chrome trace (no traceEvents list)")
    if is_profiler_trace(document):
        raise TraceFormatError(f"{path}: a torch.profiler trace, not a modtimeline one; add the modtimeline trace of "
                               f"the same run to it with `modtimeline merge --profiler {path} TRACE -o merged.json`, "
                               "and summarise merged.json")
    metadata = checked_metadata(path, document.get("metadata"))
    events: list[Any] = document["traceEvents"]
    if len(events) > limits.max_events:
        raise TraceFormatError(f"{path}: {len(events):,} events is over the {limits.max_events:,} limit "
                               "(--max-events raises it)")
    return metadata, events


def read_chrome(path: Path, raw: bytes, limits: ReadLimits, lossless: bool) -> TraceFile:
    """The trace in ``raw`` (see ``decoding`` for what ``lossless`` reads)."""
    metadata, events = chrome_document(path, raw, limits)
    processes = Processes(path, lossless)
    processes.declare(metadata)
    base_ns = processes.base_ns
    known = processes.by_rank
    for event in events:
        if not isinstance(event, dict):
            raise TraceFormatError(f"{path}: a trace event is {type(event).__name__}, not an object")
        kind = event.get("ph")
        if kind == "X":
            category_name = checked_name(path, event.get("cat", ""), "event cat", limits)
            category = CATEGORY_INDEX.get(category_name)
            if category is None:
                if lossless:
                    raise TraceFormatError(f"{path}: unknown span category {category_name[:40]!r}")
                continue  # another tool's (a torch.profiler trace we were merged into)
            pid = event.get("pid")
            process = known.get(pid) if type(pid) is int else None  # (a rank seen before: checked then)
            if process is None:
                process = processes.of(pid)
            tid = checked_int(path, event.get("tid"), "event tid")
            begin = base_ns + round(checked_microseconds(path, event.get("ts"), "ts") * 1000)
            duration = checked_microseconds(path, event.get("dur"), "dur")
            if duration < 0:
                raise TraceFormatError(f"{path}: event dur is negative ({duration})")
            args = event.get("args", {})
            if not isinstance(args, dict):
                raise TraceFormatError(f"{path}: event args is {type(args).__name__}, not an object")
            step = checked_int(path, args.get("step", -1), "event args.step")
            name = process.name(checked_name(path, event.get("name"), "event name", limits))
            call = checked_int(path, args.get("call", -1), "event args.call")
            flow = FLOW_OUT if event.get("flow_out") is True else FLOW_IN if event.get("flow_in") is True else FLOW_NONE
            # (launch lags are only kept, not analysed: checked where they are kept)
            lag = args.get("launch_lag_us") if lossless else None
            process.spans.append(tid, begin, begin + round(duration * 1000), name, category, call, step,
                                 span_flags(args), flow,
                                 NO_LAG if lag is None else round(checked_microseconds(path, lag, "launch_lag_us") * 1000))
        elif kind == "M":
            pid = event.get("pid")
            if not lossless and (event.get("name") != "thread_name" or not isinstance(pid, int)
                                 or not isinstance(event.get("tid"), int)):
                continue  # nothing the analysis reads, or another tool's (torch.profiler's "Spans" process)
            process = processes.of(pid)
            tid = checked_int(path, event.get("tid"), "event tid")
            args = event.get("args", {})
            if not isinstance(args, dict):
                raise TraceFormatError(f"{path}: event args is {type(args).__name__}, not an object")
            if event.get("name") == "thread_name":
                process.tracks[tid] = checked_name(path, args.get("name"), "thread name", limits)
        elif kind == "C" and lossless:
            process = processes.of(event.get("pid"))
            tid = checked_int(path, event.get("tid"), "event tid")
            args = event.get("args", {})
            if not isinstance(args, dict):
                raise TraceFormatError(f"{path}: event args is {type(args).__name__}, not an object")
            counter = process.counter(tid, checked_name(path, event.get("name"), "event name", limits))
            counter.times.append(base_ns + round(checked_microseconds(path, event.get("ts"), "ts") * 1000))
            counter.values.append(checked_int(path, args.get("value"), "counter value"))
    return processes.trace_file()
