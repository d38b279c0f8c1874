"""Several ranks (gloo, CPU processes, file-based rendezvous, a timeout on every test):
one trace file each, processes named by rank, and module names of the unwrapped model
under DDP and FSDP2 (and checkpoint_wrapper), so a wrapped run diffs against a plain one."""

from __future__ import annotations

import os
import time

import orjson
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from modtimeline import Timeline
from modtimeline.cli import main

from .trace_checks import load, spans

TIMEOUT_S = 180


def spawn(worker, world: int, folder) -> None:
    """Run ``worker(rank, world, folder)`` on ``world`` ranks; fail (never hang) past TIMEOUT_S."""
    context = mp.spawn(_entry, args=(worker, world, str(folder)), nprocs=world, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks did not finish in {TIMEOUT_S} s")


def _entry(rank: int, worker, world: int, folder: str) -> None:
    torch.manual_seed(0)  # every rank builds the same model
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        worker(rank, world, folder)
    finally:
        dist.destroy_process_group()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def train(model: nn.Module, path: str, steps: int = 6) -> None:
    x = torch.randn(4, 8)
    with Timeline(path) as timeline:
        for _ in range(steps):
            with timeline.step():
                model(x).sum().backward()


def _plain_and_named(rank: int, world: int, folder: str) -> None:
    model = nn.Linear(4, 1)
    with Timeline(os.path.join(folder, "run.json")) as timeline:
        with timeline.step():
            model(torch.randn(2, 4)).sum().backward()
    with Timeline(os.path.join(folder, "named-{rank}.json")):
        model(torch.randn(2, 4)).sum().backward()
    with Timeline(os.path.join(folder, "padded-{rank:03d}.json")):
        model(torch.randn(2, 4)).sum().backward()


def test_each_rank_writes_its_own_trace(tmp_path):
    spawn(_plain_and_named, 2, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [
        "named-0.json", "named-1.json", "padded-000.json", "padded-001.json", "run.rank0.json", "run.rank1.json"]
    for rank in (0, 1):
        trace = load(tmp_path / f"run.rank{rank}.json")
        assert trace["metadata"]["rank"] == rank
        assert trace["metadata"]["world_size"] == 2 and trace["metadata"]["hostname"]
        assert {e["pid"] for e in spans(trace)} == {rank}
        names = [e for e in trace["traceEvents"] if e.get("name") == "process_name"]
        assert names[0]["args"]["name"] == f"rank {rank}"


def _ddp(rank: int, world: int, folder: str) -> None:
    train(nn.parallel.DistributedDataParallel(Net()), os.path.join(folder, "ddp-{rank}.json"))


def _fsdp2(rank: int, world: int, folder: str) -> None:
    from torch.distributed.fsdp import fully_shard

    model = Net()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    train(model, os.path.join(folder, "fsdp-{rank}.json"))


def _fsdp2_over_checkpoint_wrapper(rank: int, world: int, folder: str) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import fully_shard

    model = Net()
    for i, block in enumerate(model.blocks):
        model.blocks[i] = fully_shard(checkpoint_wrapper(block))  # the usual large-model recipe
    fully_shard(model)
    train(model, os.path.join(folder, "fsdp-ckpt-{rank}.json"))
    os.environ["MODTIMELINE_PURE_PYTHON"] = "1"  # the other recording path, in this process
    from modtimeline.capture import recorder

    recorder._last_registry = None
    train(model, os.path.join(folder, "fsdp-ckpt-python-{rank}.json"))


MODEL_NAMES = {"Net", "Net.blocks", "Net.head"} | {f"Net.blocks.{i}{sub}" for i in range(2) for sub in ("", ".0", ".1")}


def _names(path) -> set[str]:
    return {e["name"] for e in spans(load(path)) if e["cat"] != "step"}


def test_ddp_names_are_the_unwrapped_models_and_diff_matches_a_plain_run(tmp_path, capsys):
    spawn(_ddp, 2, tmp_path)
    torch.manual_seed(0)
    train(Net(), str(tmp_path / "plain.json"))
    for rank in (0, 1):
        assert _names(tmp_path / f"ddp-{rank}.json") == MODEL_NAMES | {"Net (DistributedDataParallel)"}
    assert main(["diff", "--json", "--warmup", "1", "--min-samples", "3", str(tmp_path / "plain.json"),
                 str(tmp_path / "ddp-0.json")]) in (0, 1, 3)  # (what is compared is the point, not verdicts)
    report = orjson.loads(capsys.readouterr().out)
    assert {(s["fqn"], s["change"]) for s in report["structural"]} <= {
        ("Net (DistributedDataParallel)", "added")}
    compared = {m["fqn"] for m in report["modules"]}
    assert compared == MODEL_NAMES


def test_fsdp2_names_are_the_unwrapped_models(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    spawn(_fsdp2, 2, tmp_path)
    for rank in (0, 1):
        names = _names(tmp_path / f"fsdp-{rank}.json")
        assert names == MODEL_NAMES, names  # not FSDPNet


@pytest.mark.slow
def test_fsdp2_over_checkpoint_wrapper_names_are_the_wrapped_modules(tmp_path):
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    spawn(_fsdp2_over_checkpoint_wrapper, 2, tmp_path)
    expected = MODEL_NAMES | {f"Net.blocks.{i} (CheckpointWrapper)" for i in range(2)}
    for rank in (0, 1):
        for path in (f"fsdp-ckpt-{rank}.json", f"fsdp-ckpt-python-{rank}.json"):
            names = _names(tmp_path / path)
            assert names == expected, (path, names)  # no _checkpoint_wrapped_module


def test_checkpoint_wrapper_names_are_the_wrapped_modules(tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = Net()
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)
    train(model, str(tmp_path / "ckpt.json"), steps=2)
    names = _names(tmp_path / "ckpt.json")
    assert names == MODEL_NAMES | {f"Net.blocks.{i} (CheckpointWrapper)" for i in range(2)}


# ---------------------------------------------------------------- one clock for the job
SHIFT_NS = 200_000_000  # rank 1's clock runs 200 ms ahead of rank 0's


def _shifted_clock_ddp(rank: int, world: int, folder: str) -> None:
    if rank == 1:
        # A host whose clock reads differently: every clock reading of this process
        # (the pure-Python recorder reads time.perf_counter_ns) is 200 ms ahead.
        os.environ["MODTIMELINE_PURE_PYTHON"] = "1"
        real = time.perf_counter_ns
        time.perf_counter_ns = lambda: real() + SHIFT_NS  # type: ignore[assignment]
    model = nn.parallel.DistributedDataParallel(Net())
    x = torch.randn(4, 8)
    with Timeline(os.path.join(folder, "job-{rank}.json")) as timeline:
        for _ in range(4):
            with timeline.step():
                dist.barrier()  # (the test's oracle: both ranks leave it together)
                model(x).sum().backward()


def _forward_begins(trace: dict) -> list[float]:
    return sorted(e["ts"] for e in spans(trace) if e["name"] == "Net" and e["cat"] == "forward")


def test_merge_puts_a_shifted_rank_on_rank_0s_clock_within_the_reported_bound(tmp_path, capsys):
    spawn(_shifted_clock_ddp, 2, tmp_path)
    rank0, rank1 = load(tmp_path / "job-0.json"), load(tmp_path / "job-1.json")
    assert rank0["metadata"]["run_id"] == rank1["metadata"]["run_id"]  # one id for the job
    samples = rank1["metadata"]["clock_sync"]["samples"]
    assert len(samples) == 2  # at entry and at the write
    for _, offset, error in samples:
        # The true offset is -SHIFT_NS exactly (one host, one clock): the estimate is
        # within the bound it states, and the bound is that of a round trip.
        assert abs(offset + SHIFT_NS) <= error < 50_000_000
    assert [s[1:] for s in rank0["metadata"]["clock_sync"]["samples"]] == [[0, 0], [0, 0]]

    out = tmp_path / "job.json"
    assert main(["merge", str(tmp_path / "job-0.json"), str(tmp_path / "job-1.json"), "-o", str(out)]) == 0
    assert "rank 1" in capsys.readouterr().out
    merged = load(out)
    assert merged["metadata"]["merged"] is True
    assert {e["pid"] for e in spans(merged)} == {0, 1}
    names = {e["args"]["name"] for e in merged["traceEvents"] if e.get("name") == "process_name"}
    assert names == {f"rank {r} · {rank0['metadata']['hostname']}" for r in (0, 1)}
    by_rank = {r: sorted(e["ts"] for e in spans(merged) if e["pid"] == r and e["name"] == "Net"
                         and e["cat"] == "forward") for r in (0, 1)}
    # Each step's forward starts as both ranks leave the barrier: 200 ms apart in the
    # ranks' own files, together (within scheduling noise) once merged.
    raw_gaps = [b - a for a, b in zip(_forward_begins(rank0), _forward_begins(rank1))]
    base_gap = (rank1["metadata"]["base_ns"] - rank0["metadata"]["base_ns"]) / 1000
    assert all(abs(gap + base_gap - SHIFT_NS / 1000) < 50_000 for gap in raw_gaps)
    assert all(abs(b - a) < 50_000 for a, b in zip(by_rank[0], by_rank[1]))  # µs
    # flow ids stay unique across ranks
    binds = [e["bind_id"] for e in spans(merged) if e.get("flow_out")]
    assert len(binds) == len(set(binds)) > 0


def _late_rank(rank: int, world: int, folder: str) -> None:
    from modtimeline import RankSyncError

    if rank == 1:
        time.sleep(12)  # never enters its Timeline; stays up while rank 0 waits
        return
    started = time.monotonic()
    with pytest.raises(RankSyncError, match="rank 0: could not .* within 3 s.*align_ranks=False"):
        with Timeline(os.path.join(folder, "t-{rank}.json"), rank_timeout_s=3):
            pass
    assert time.monotonic() - started < 10
    # Tracing rank 0 alone is fine when said so: no waiting, no clock samples.
    started = time.monotonic()
    with Timeline(os.path.join(folder, "alone-{rank}.json"), align_ranks=False, rank_timeout_s=3):
        nn.Linear(2, 2)(torch.randn(1, 2)).sum().backward()
    assert time.monotonic() - started < 3
    open(os.path.join(folder, "raised"), "w").close()


def test_a_rank_that_never_enters_makes_the_others_fail_clearly_not_hang(tmp_path):
    spawn(_late_rank, 2, tmp_path)
    assert (tmp_path / "raised").exists()
    assert not list(tmp_path.glob("t-*.json"))
    alone = load(tmp_path / "alone-0.json")
    assert "clock_sync" not in alone["metadata"] and alone["metadata"]["world_size"] == 2


class Sleepy(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


def _straggler(rank: int, world: int, folder: str) -> None:
    model = nn.Sequential(nn.Linear(8, 8), Sleepy(0.05 if rank == 2 else 0.0), nn.Linear(8, 1))
    x = torch.randn(4, 8)
    with Timeline(os.path.join(folder, "job.json")) as timeline:
        for _ in range(5):
            with timeline.step():
                model(x).sum().backward()
            dist.barrier()  # (between steps: the ranks start each step together)


def test_four_ranks_merge_and_the_straggler_view_names_the_slow_rank(tmp_path, capsys):
    spawn(_straggler, 4, tmp_path)
    assert main(["merge", str(tmp_path), "-o", str(tmp_path / "merged.pftrace")]) == 0
    capsys.readouterr()
    for source in ([str(p) for p in sorted(tmp_path.glob("job.rank*.json"))], [str(tmp_path / "merged.pftrace")]):
        # (steps of about a millisecond, 4 processes on this machine's cores: a threshold
        # well above their scheduling noise; rank 2's steps are 50 ms)
        assert main(["summary", "--by-rank", "--format", "json", "--straggler-threshold", "2", *source]) == 0
        view = orjson.loads(capsys.readouterr().out)
        assert view["slow_ranks"] == [2]
        assert [r["rank"] for r in view["ranks"]] == [0, 1, 2, 3]
        sleepy = next(m for m in view["modules"] if m["fqn"] == "Sequential.1" and m["phase"] == "forward")
        assert sleepy["slowest_rank"] == 2 and sleepy["uneven"]
