"""Ranks of one job on one clock: each rank's offset to rank 0, measured over torch.distributed.

Every trace's times are ``perf_counter_ns`` readings of its own process. Ranks on one host
share that clock; ranks on different hosts do not (their clocks differ by seconds, and the
wall clocks by their NTP error). ``RankClock.sample()`` measures the offset NTP-style over
the process group: rank ``r`` reads its clock (t1), pings rank 0, rank 0 answers with its
own clock (t2), rank ``r`` reads again (t3). Rank 0's clock was at t2 somewhere between t1
and t3, so ``offset = t2 - (t1 + t3) / 2`` is wrong by at most ``(t3 - t1) / 2``; of several
round trips the tightest is kept. ``modtimeline merge`` then puts every rank's times on
rank 0's clock (``local + offset``), interpolating between the samples of a window.

The exchange runs on a gloo group of our own (CPU tensors work whatever the default
backend; our timeout bounds every wait), only when a Timeline starts and when it writes
a window: never inside a training step. A rank that never arrives makes the others fail
with ``RankSyncError`` after ``timeout_s``, not hang.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ..errors import RankSyncError

REFERENCE_RANK = 0
ROUNDS = 8  # round trips per rank and sample; the tightest one is kept
_RUN_ID_BYTES = 32  # a uuid4().hex


@dataclass(frozen=True)
class ClockSample:
    """At ``local_ns`` on this rank's clock, rank 0's clock read ``local_ns + offset_ns``,
    give or take ``error_ns``."""

    local_ns: int
    offset_ns: int
    error_ns: int

    def to_json(self) -> list[int]:
        return [self.local_ns, self.offset_ns, self.error_ns]


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


# One gloo group per default group, shared by every Timeline of the process: creating a
# group is itself a rendezvous of all ranks, and groups are never freed by torch.
_groups: dict[int, tuple[Any, Any]] = {}  # id(default group) -> (default group, our group)


class RankClock:
    """This rank's clock offset to rank 0, sampled when a Timeline starts and writes."""

    def __init__(self, timeout_s: float, rounds: int = ROUNDS) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world_size = distributed_world()
        self.timeout_s = timeout_s
        self.rounds = rounds
        self._group: Any = None

    def _our_group(self) -> Any:
        dist = self._dist
        world = dist.group.WORLD
        cached = _groups.get(id(world))
        if cached is not None and cached[0] is world:
            return cached[1]
        try:
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as error:
            raise self._failed("create its process group", error) from None
        _groups.clear()  # a group of an earlier, destroyed default group is of no use
        _groups[id(world)] = (world, group)
        return group

    def _failed(self, what: str, error: BaseException) -> RankSyncError:
        return RankSyncError(
            f"rank {self.rank}: could not {what} to align clocks with the other ranks within "
            f"{self.timeout_s:g} s ({str(error).splitlines()[0][:200]}). Every rank of the job must enter "
            "its Timeline (and leave it, or end a scheduled window) at the same point; pass "
            "rank_timeout_s= to wait longer, or align_ranks=False to trace some ranks only")

    def share_run_id(self, run_id: str) -> str:
        """Rank 0's run id, for every rank (one id names all files of one job)."""
        if self._group is None:
            self._group = self._our_group()
        data = torch.zeros(_RUN_ID_BYTES, dtype=torch.uint8)
        if self.rank == REFERENCE_RANK:
            encoded = run_id.encode()[:_RUN_ID_BYTES]
            data[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
        try:
            self._dist.broadcast(data, src=REFERENCE_RANK, group=self._group)
        except RuntimeError as error:
            raise self._failed("agree on a run id", error) from None
        return bytes(data.tolist()).rstrip(b"\0").decode(errors="replace")

    def sample(self) -> ClockSample:
        """Measure this rank's offset to rank 0 (every rank must call it together)."""
        if self._group is None:
            self._group = self._our_group()
        now = time.perf_counter_ns
        dist, group = self._dist, self._group
        ping = torch.zeros(1, dtype=torch.int64)
        reply = torch.zeros(1, dtype=torch.int64)
        try:
            if self.rank == REFERENCE_RANK:
                # Answer each rank in turn: its ping, then our clock at once.
                for other in range(1, self.world_size):
                    for _ in range(self.rounds):
                        dist.recv(ping, src=other, group=group)
                        reply[0] = now()
                        dist.send(reply, dst=other, group=group)
                local = now()
                return ClockSample(local, 0, 0)
            best: ClockSample | None = None
            for _ in range(self.rounds):
                sent = now()
                dist.send(ping, dst=REFERENCE_RANK, group=group)
                dist.recv(reply, src=REFERENCE_RANK, group=group)
                received = now()
                middle = (sent + received) // 2
                candidate = ClockSample(middle, int(reply[0]) - middle, (received - sent + 1) // 2)
                if best is None or candidate.error_ns < best.error_ns:
                    best = candidate
            assert best is not None
            return best
        except RuntimeError as error:
            raise self._failed("exchange clock readings", error) from None
