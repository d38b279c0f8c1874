"""Reading a written Chrome trace back in tests, and checking it nests."""

from collections import defaultdict
from pathlib import Path

import orjson


def load(path: Path) -> dict:
    data = path.read_bytes()
    if str(path).endswith(".gz"):
        import gzip

        data = gzip.decompress(data)
    return orjson.loads(data)


def spans(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e.get("ph") == "X"]


def thread_names(trace: dict) -> dict[int, str]:
    return {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}


def gpu_track_spans(trace: dict) -> list[tuple[str, str, str, int]]:
    """(track, name, category, step) of every span on a GPU track, sorted."""
    names = thread_names(trace)
    return sorted((names[e["tid"]], e["name"], e["cat"], e["args"]["step"]) for e in spans(trace)
                  if names[e["tid"]].startswith("cuda"))


def assert_nested(trace: dict) -> None:
    """On every track, any two spans are disjoint or one contains the other."""
    by_track = defaultdict(list)
    for e in spans(trace):
        begin = round(e["ts"] * 1000)
        by_track[e["tid"]].append((begin, begin + round(e["dur"] * 1000), e["name"]))
    _assert_tracks_nest(by_track)


def assert_nested_columns(columns) -> None:
    """``assert_nested`` on resolve's span columns, before any file is written."""
    by_track = defaultdict(list)
    for i in range(len(columns)):
        by_track[columns.track[i]].append((columns.begin[i], columns.end[i], f"row {i}"))
    _assert_tracks_nest(by_track)


def _assert_tracks_nest(by_track: dict) -> None:
    for tid, items in by_track.items():
        items.sort(key=lambda s: (s[0], -s[1]))
        stack = []
        for begin, end, name in items:
            while stack and stack[-1][1] <= begin:
                stack.pop()
            assert not stack or end <= stack[-1][1], f"track {tid}: {name} overlaps {stack[-1][2]} partially"
            stack.append((begin, end, name))
