"""Fuzzing the readers and the config (hypothesis, bounded to well under a minute): any
bytes, any JSON near a real trace, any TOML: exit 0 or 2 and one line, never a traceback."""

from __future__ import annotations

import copy
import gzip
import math

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modtimeline.analysis.diff import load_config
from modtimeline.analysis.reader import read_trace
from modtimeline.errors import ModTimelineError

from . import synthetic

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict:
    path = synthetic.write(tmp_path_factory.mktemp("fuzz") / "t.json", count=3, steps=3, seed=1)
    return orjson.loads(path.read_bytes())


def _reads_or_refuses(path) -> None:
    try:
        trace = read_trace(path)
    except ModTimelineError as error:
        assert str(error).startswith(str(path)), str(error)
        return
    for span in trace.spans:  # what is read is usable: names are text, times finite
        assert isinstance(span.name, str) and isinstance(span.begin_ns, int) and isinstance(span.end_ns, int)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_any_bytes(raw, tmp_path):
    path = tmp_path / "f.json"
    path.write_bytes(raw)
    _reads_or_refuses(path)
    path.write_bytes(gzip.compress(raw))
    _reads_or_refuses(path)


@FUZZ
@given(data=st.data())
def test_real_traces_with_one_field_replaced(valid, data, tmp_path):
    document = copy.deepcopy(valid)
    events = document["traceEvents"]
    event = events[data.draw(st.integers(0, len(events) - 1))]
    key = data.draw(st.sampled_from(sorted(event) + ["args", "extra"]))
    target = event["args"] if key == "args" and isinstance(event.get("args"), dict) and data.draw(st.booleans()) else event
    target[data.draw(st.sampled_from(sorted(target) or ["x"])) if target is not event else key] = data.draw(json_values)
    if data.draw(st.booleans()):
        document["metadata"][data.draw(st.sampled_from(sorted(document["metadata"])))] = data.draw(json_values)
    path = tmp_path / "f.json"
    path.write_bytes(orjson.dumps(document))
    _reads_or_refuses(path)


@FUZZ
@given(raw=st.binary(max_size=200), cut=st.floats(0, 1))
def test_truncated_and_spliced_traces(valid, raw, cut, tmp_path):
    whole = orjson.dumps(valid)
    at = math.floor(cut * len(whole))
    path = tmp_path / "f.json"
    path.write_bytes(whole[:at] + raw + whole[at:] if raw else whole[:at])
    _reads_or_refuses(path)


toml_values = st.one_of(st.floats(), st.integers(-(2**63), 2**63 - 1), st.booleans(), st.text(max_size=8),
                        st.lists(st.integers(-5, 5), max_size=3))


@FUZZ
@given(settings_table=st.dictionaries(st.sampled_from(["threshold", "floor_us", "alpha", "correction", "warmup",
                                                       "min_samples", "noisy_spread", "max_drift", "x"]),
                                      toml_values, max_size=4),
       module=st.dictionaries(st.sampled_from(["match", "threshold", "floor_us", "ignore", "y"]), toml_values,
                              max_size=4))
def test_any_config(settings_table, module, tmp_path):
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
        return orjson.dumps(v).decode()

    lines = ["[diff]"] + [f"{k} = {value(v)}" for k, v in settings_table.items()]
    lines += ["[[diff.module]]"] + [f"{k} = {value(v)}" for k, v in module.items()]
    path = tmp_path / "c.toml"
    path.write_text("\n".join(lines))
    try:
        config = load_config(path)
    except ModTimelineError:
        return
    for rule in [config.default, *config.rules]:  # what loads can never hide a regression
        assert math.isfinite(rule.threshold) and rule.threshold >= 0
        assert math.isfinite(rule.floor_us) and rule.floor_us >= 0
        assert isinstance(rule.ignore, bool)
    assert 0 < config.alpha <= 0.5 and config.min_samples >= 2 and config.warmup >= 0
