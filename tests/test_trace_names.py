"""A trace carries the names of the modules it recorded, not of every module the
process ever traced (issue 24, item 7)."""

import pytest
import torch
from torch import nn

from modtimeline import Timeline
from modtimeline.analysis.reader import read_trace

pytestmark = pytest.mark.twin


@pytest.mark.parametrize("suffix", [".pftrace", ".json"])
def test_a_small_trace_after_a_big_model_stays_small(tmp_path, suffix):
    small = nn.Linear(8, 8)

    def record_small(path):
        with Timeline(path):
            small(torch.randn(2, 8)).sum().backward()
        return path.stat().st_size

    before = record_small(tmp_path / f"before{suffix}")
    big = nn.Sequential(*[nn.Linear(1, 1) for _ in range(3000)])  # kept alive: its names stay known
    with Timeline(tmp_path / f"big{suffix}"):
        big(torch.randn(1, 1)).sum().backward()
    after = record_small(tmp_path / f"after{suffix}")
    # (the same spans; only the run id and the times differ)
    assert after <= before + 64, (before, after)
    trace = read_trace(tmp_path / f"after{suffix}")
    assert {span.name for span in trace.spans} == {"Linear"}
    assert len(big) == 3000
