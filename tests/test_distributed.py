"""Two ranks (gloo, CPU processes): one trace file each, process named by rank."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modtimeline import Timeline

from .trace_checks import load, spans


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.Linear(4, 1)
        with Timeline(os.path.join(folder, "run.json")) as timeline:
            with timeline.step():
                model(torch.randn(2, 4)).sum().backward()
        with Timeline(os.path.join(folder, "named-{rank}.json")):
            model(torch.randn(2, 4)).sum().backward()
    finally:
        dist.destroy_process_group()


def test_each_rank_writes_its_own_trace(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "named-0.json", "named-1.json", "run.rank0.json", "run.rank1.json"]
    for rank in (0, 1):
        trace = load(tmp_path / f"run.rank{rank}.json")
        assert trace["metadata"]["rank"] == rank
        assert {e["pid"] for e in spans(trace)} == {rank}
        names = [e for e in trace["traceEvents"] if e.get("name") == "process_name"]
        assert names[0]["args"]["name"] == f"rank {rank}"
