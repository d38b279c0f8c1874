"""Compare per-step module timings of two sets of traces and give each module a verdict.

A module (FQN, phase, device) *regressed* only when all three agree:

* a rank test (Mann-Whitney U on per-step inclusive times), corrected for testing
  every module at once (Holm by default, or Benjamini-Hochberg), is significant;
* the median got slower by more than a relative threshold (default 5 %);
* and by more than an absolute floor (default 20 µs per step), so tiny modules whose
  relative noise is large never fail a build.

A change past both thresholds without significance is *inconclusive* (too noisy or
too few steps), never a silent pass. Steps too few for any module to reach significance
after the correction (or fewer than ``min_samples``) make the whole report *cannot judge*
(``DiffReport.cannot_judge`` says why): the gate neither passes nor fails. Thresholds can
be set per FQN glob.

Machine drift: base and candidate recorded one after the other on a shared machine
differ by however much the machine's speed changed in between, in every module alike.
The common shift (the median over modules of candidate/base) is estimated and the base
times are scaled by it before each module is judged, so only a module that moved *more
than the rest* is flagged; the shift itself is reported. A shift larger than
``max_drift`` is not taken for drift: modules are then judged as measured.
"""

from __future__ import annotations

import fnmatch
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TraceFormatError
from .reader import Key, Sample, Trace, samples
from .stats import benjamini_hochberg, holm, mann_whitney_u, median, relative_spread, smallest_p

REGRESSED, IMPROVED, UNCHANGED, INCONCLUSIVE = "regressed", "improved", "unchanged", "inconclusive"


@dataclass
class Rule:
    """Thresholds for the modules whose FQN matches ``match`` (an fnmatch glob)."""

    match: str = "*"
    threshold: float = 0.05
    floor_us: float = 20.0
    ignore: bool = False


@dataclass
class DiffConfig:
    alpha: float = 0.05
    correction: str = "holm"  # or "bh"
    warmup: int = 1
    min_samples: int = 5
    noisy_spread: float = 0.10  # warn when MAD/median of a side exceeds this
    # A common shift of every module up to this much is machine drift (the machine got
    # slower or faster between the runs), and each module is judged against it; 0 turns
    # the correction off.
    max_drift: float = 0.25
    default: Rule = field(default_factory=Rule)
    rules: list[Rule] = field(default_factory=list)

    def rule_for(self, fqn: str) -> Rule:
        """The last matching rule wins (so specific rules go below general ones)."""
        chosen = self.default
        for rule in self.rules:
            if fnmatch.fnmatchcase(fqn, rule.match):
                chosen = rule
        return chosen


def load_config(path: str | Path, base: DiffConfig | None = None) -> DiffConfig:
    """Read thresholds from a TOML file::

        [diff]
        threshold = 0.05      # relative, for every module
        floor_us = 20
        alpha = 0.05
        correction = "holm"   # or "bh"
        warmup = 1

        [[diff.module]]
        match = "GPT.blocks.*.attn"
        threshold = 0.10
        floor_us = 50

        [[diff.module]]
        match = "GPT.embed"
        ignore = true
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        raise ConfigError("reading a TOML config needs Python 3.11 or newer")
    config = base or DiffConfig()
    try:
        text = Path(path).read_bytes().decode("utf-8")
        document = tomllib.loads(text)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
    unknown_tables = set(document) - {"diff"}
    if unknown_tables:
        raise ConfigError(f"{path}: unknown top-level settings: {', '.join(sorted(unknown_tables))} "
                               "(settings go under [diff])")
    section = document.get("diff", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: diff must be a table ([diff]), not {type(section).__name__}")
    check = _ConfigChecker(str(path))
    check.known("[diff]", section, set(_SETTINGS) | {"threshold", "floor_us", "module"})
    for key, (kind, low, high) in _SETTINGS.items():
        if key in section:
            setattr(config, key, check.value(f"[diff] {key}", section[key], kind, low, high))
    if config.correction not in ("holm", "bh"):
        raise ConfigError(f"{path}: [diff] correction must be \"holm\" or \"bh\", not {config.correction!r}")
    threshold = check.value("[diff] threshold", section.get("threshold", config.default.threshold), float, 0, 100)
    floor_us = check.value("[diff] floor_us", section.get("floor_us", config.default.floor_us), float, 0, 1e12)
    config.default = Rule("*", threshold, floor_us)
    modules = section.get("module", [])
    if not isinstance(modules, list):
        raise ConfigError(f"{path}: [diff] module must be a list of [[diff.module]] tables")
    for number, entry in enumerate(modules, start=1):
        where = f"[[diff.module]] #{number}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: {where} must be a table")
        check.known(where, entry, {"match", "threshold", "floor_us", "ignore"})
        if "match" not in entry:
            raise ConfigError(f"{path}: {where} needs a match = \"FQN glob\"")
        config.rules.append(Rule(
            check.value(f"{where} match", entry["match"], str),
            check.value(f"{where} threshold", entry.get("threshold", threshold), float, 0, 100),
            check.value(f"{where} floor_us", entry.get("floor_us", floor_us), float, 0, 1e12),
            check.value(f"{where} ignore", entry.get("ignore", False), bool)))
    return config


# [diff] settings: (type, lowest, highest) — bounds inclusive.
_SETTINGS: dict[str, tuple[type, float | None, float | None]] = {
    "alpha": (float, 1e-12, 0.5),
    "correction": (str, None, None),
    "warmup": (int, 0, 1_000_000),
    "min_samples": (int, 2, 1_000_000),
    "noisy_spread": (float, 0, 100),
    "max_drift": (float, 0, 0.9),
}


class _ConfigChecker:
    """Every value checked for type, range and NaN, naming the key on error: a config
    that could hide a regression (threshold = nan, ignore = "false") must not load."""

    def __init__(self, path: str) -> None:
        self.path = path

    def known(self, where: str, table: dict[str, Any], allowed: set[str]) -> None:
        unknown = set(table) - allowed
        if unknown:
            raise ConfigError(f"{self.path}: unknown {where} settings: {', '.join(sorted(unknown))}")

    def value(self, key: str, value: Any, kind: type, low: float | None = None, high: float | None = None) -> Any:
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{self.path}: {key} must be true or false, not {value!r}")
            return value
        if kind is str:
            if not isinstance(value, str):
                raise ConfigError(f"{self.path}: {key} must be a string, not {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ConfigError(f"{self.path}: {key} must be {'a whole number' if kind is int else 'a number'}, "
                                   f"not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{self.path}: {key} must be a finite number, not {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"{self.path}: {key} must be between {low:g} and {high:g}, not {value!r}")
        return kind(value)


@dataclass
class ModuleDiff:
    fqn: str
    phase: str
    device: str
    verdict: str
    base_us: float  # median per-step inclusive time
    candidate_us: float
    delta_us: float
    ratio: float
    self_delta_us: float  # how much of the change is the module's own code
    children_delta_us: float  # and how much is in the modules it calls
    p_value: float
    p_adjusted: float
    base_steps: int
    candidate_steps: int
    notes: list[str] = field(default_factory=list)


@dataclass
class StructuralChange:
    fqn: str
    phase: str
    device: str
    change: str  # "added", "removed", "calls changed"
    base_calls: float
    candidate_calls: float


@dataclass
class DiffReport:
    modules: list[ModuleDiff]
    structural: list[StructuralChange]
    warnings: list[str]
    base_files: list[str]
    candidate_files: list[str]
    config: DiffConfig
    drift: float = 1.0  # candidate/base common shift the base was scaled by
    # Why no module could have been found slower, if none could (too few steps for the
    # test to reach significance over this many modules): the gate judged nothing.
    cannot_judge: str | None = None

    @property
    def regressed(self) -> list[ModuleDiff]:
        return [m for m in self.modules if m.verdict == REGRESSED]

    def counts(self) -> dict[str, int]:
        counts = {REGRESSED: 0, IMPROVED: 0, UNCHANGED: 0, INCONCLUSIVE: 0}
        for m in self.modules:
            counts[m.verdict] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": self.counts(),
            "modules": [asdict(m) for m in self.modules],
            "structural": [asdict(s) for s in self.structural],
            "warnings": self.warnings,
            "base": self.base_files,
            "candidate": self.candidate_files,
            "drift": self.drift,
            "cannot_judge": self.cannot_judge,
            "settings": {"alpha": self.config.alpha, "correction": self.config.correction,
                         "warmup": self.config.warmup, "threshold": self.config.default.threshold,
                         "floor_us": self.config.default.floor_us},
        }


def pooled_samples(traces: list[Trace], warmup: int) -> dict[Key, list[Sample]]:
    """Every trace's per-step samples, pooled (each step of each trace is one sample)."""
    pooled: dict[Key, list[Sample]] = {}
    for trace in traces:
        for key, per_step in samples(trace, warmup).items():
            pooled.setdefault(key, []).extend(per_step[step] for step in sorted(per_step))
    return pooled


def diff(base: list[Trace], candidate: list[Trace], config: DiffConfig | None = None) -> DiffReport:
    config = config or DiffConfig()
    base_samples = pooled_samples(base, config.warmup)
    candidate_samples = pooled_samples(candidate, config.warmup)
    if not base_samples or not candidate_samples:
        side = "base" if not base_samples else "candidate"
        raise TraceFormatError(f"the {side} traces hold no module spans after {config.warmup} warm-up step(s); "
                               "record more steps or lower --warmup")
    common = sorted(set(base_samples) & set(candidate_samples))
    if not common:
        raise TraceFormatError("base and candidate have no module in common: are they traces of the same model?")
    warnings: list[str] = []
    drift = _machine_drift(base_samples, candidate_samples, common, config, warnings)

    structural: list[StructuralChange] = []
    for key in sorted(set(base_samples) - set(candidate_samples)):
        structural.append(StructuralChange(*key, "removed", _median_calls(base_samples[key]), 0))
    for key in sorted(set(candidate_samples) - set(base_samples)):
        structural.append(StructuralChange(*key, "added", 0, _median_calls(candidate_samples[key])))

    rows: list[ModuleDiff] = []
    tested: list[int] = []
    noisy: list[str] = []
    for key in common:
        rule = config.rule_for(key[0])
        if rule.ignore:
            continue
        a, b = base_samples[key], candidate_samples[key]
        base_calls, candidate_calls = _median_calls(a), _median_calls(b)
        if base_calls != candidate_calls:
            structural.append(StructuralChange(*key, "calls changed", base_calls, candidate_calls))
        a_us = [s.inclusive_ns / 1000 * drift for s in a]  # the base, on the candidate machine's speed
        b_us = [s.inclusive_ns / 1000 for s in b]
        base_median, candidate_median = median(a_us), median(b_us)
        self_delta = median([s.self_ns / 1000 for s in b]) - median([s.self_ns / 1000 * drift for s in a])
        delta = candidate_median - base_median
        row = ModuleDiff(*key, UNCHANGED, base_median, candidate_median, delta,
                         candidate_median / base_median if base_median else float("inf"),
                         self_delta, delta - self_delta, 1.0, 1.0, len(a), len(b))
        approximate = sum(s.approximate for s in a) + sum(s.approximate for s in b)
        if approximate:
            row.notes.append(f"{approximate} call(s) with an approximate backward end (an upper bound)")
        if len(a) < config.min_samples or len(b) < config.min_samples:
            if _practical(row, rule):
                row.verdict = INCONCLUSIVE
                row.notes.append(f"{row.ratio - 1:+.1%}, too few steps to judge ({len(a)} vs {len(b)}; "
                                 f"need {config.min_samples})")
            else:
                row.notes.append(f"too few steps to judge ({len(a)} vs {len(b)}), within the thresholds")
        else:
            row.p_value = mann_whitney_u(a_us, b_us)
            tested.append(len(rows))
            spread = max(relative_spread(a_us), relative_spread(b_us))
            if spread > config.noisy_spread and base_median > rule.floor_us:
                row.notes.append(f"noisy: per-step spread {spread:.0%}")
                noisy.append(key[0])
        rows.append(row)

    adjust = _correction(config)
    # The best each row's steps allow (every value of one side below every value of the
    # other), corrected as the real p-values are: no row below alpha means no module could
    # have been found slower, whatever the traces held.
    best = adjust([smallest_p(rows[i].base_steps, rows[i].candidate_steps) for i in tested])
    for index, p_adjusted, best_adjusted in zip(tested, adjust([rows[i].p_value for i in tested]), best):
        row = rows[index]
        row.p_adjusted = p_adjusted
        if not _practical(row, config.rule_for(row.fqn)):
            continue
        if p_adjusted < config.alpha:
            row.verdict = REGRESSED if row.delta_us > 0 else IMPROVED
        else:
            row.verdict = INCONCLUSIVE
            row.notes.append(f"{row.ratio - 1:+.1%} but not significant (p={p_adjusted:.2g} after correction)"
                             + ("" if best_adjusted < config.alpha else
                                f"; {row.base_steps} vs {row.candidate_steps} steps cannot reach significance "
                                f"(p ≥ {best_adjusted:.2g})"))
    cannot_judge = None
    judged = any(row.verdict in (REGRESSED, IMPROVED) for row in rows)
    if rows and not judged and not any(p < config.alpha for p in best):
        cannot_judge = _why_nothing_can_be_judged([rows[i] for i in tested], min(best, default=1.0), len(rows), config)

    steps_base = min((len(v) for v in base_samples.values()), default=0)
    steps_candidate = min((len(v) for v in candidate_samples.values()), default=0)
    if min(steps_base, steps_candidate) < config.min_samples:
        unmarked = ("; a trace without steps marked is one step: mark them with `with timeline.step():`"
                    if not all(t.steps_marked for t in base + candidate) else "")
        warnings.append(f"few steps per side after warm-up (base {steps_base}, candidate {steps_candidate}): "
                        f"verdicts need at least {config.min_samples}; record more steps{unmarked}")
    if noisy:
        warnings.append(f"{len(noisy)} module(s) with noisy per-step times (spread > {config.noisy_spread:.0%}), "
                        f"e.g. {noisy[0]}: interleave base and candidate runs on one machine")
    rows.sort(key=lambda r: -abs(r.delta_us))
    return DiffReport(rows, structural, warnings, [str(t.path) for t in base], [str(t.path) for t in candidate], config,
                      drift, cannot_judge)


def _practical(row: ModuleDiff, rule: Rule) -> bool:
    """Past both thresholds: a change worth a verdict, if the test can tell."""
    return abs(row.delta_us) > rule.floor_us and abs(row.ratio - 1) > rule.threshold


def _correction(config: DiffConfig) -> Callable[[Sequence[float]], list[float]]:
    return holm if config.correction == "holm" else benjamini_hochberg


def _why_nothing_can_be_judged(tested: list[ModuleDiff], best: float, rows: int, config: DiffConfig) -> str:
    """Why no row could be significant (``best``: the smallest corrected p the tested rows'
    steps allow), and how many steps a side would let one be (with ``rows`` rows tested,
    the correction's best case)."""
    adjust = _correction(config)
    needed = config.min_samples
    while needed < 100_000 and min(adjust([smallest_p(needed, needed)] * rows)) >= config.alpha:
        needed += 1
    if not tested:
        return (f"no module has {config.min_samples} steps a side after warm-up; record at least {needed} steps a "
                "side, plus the warm-up")
    steps = min(min(row.base_steps, row.candidate_steps) for row in tested)
    return (f"with {steps} step{'s' if steps != 1 else ''} a side, the rank test over {len(tested)} module rows "
            f"cannot reach alpha {config.alpha:g} after correction (its smallest p is {best:.2g}), so no regression "
            f"could be found; record at least {needed} steps a side after warm-up")


def _machine_drift(base: dict[Key, list[Sample]], candidate: dict[Key, list[Sample]], common: list[Key],
                   config: DiffConfig, warnings: list[str]) -> float:
    """The factor by which every module moved together (1.0: none, or not drift)."""
    if config.max_drift <= 0:
        return 1.0
    logs = []
    for key in common:
        rule = config.rule_for(key[0])
        a, b = base[key], candidate[key]
        if rule.ignore or len(a) < config.min_samples or len(b) < config.min_samples:
            continue
        base_median = median([s.inclusive_ns / 1000 for s in a])
        candidate_median = median([s.inclusive_ns / 1000 for s in b])
        if base_median > rule.floor_us and candidate_median > 0:
            logs.append(math.log(candidate_median / base_median))
    if len(logs) < 5:
        return 1.0  # too few modules to tell a shift of the machine from a change of the code
    shift = math.exp(median(logs))
    if abs(shift - 1) > config.max_drift:
        warnings.append(f"every module moved by {shift - 1:+.1%} together: more than machine drift "
                        f"(max_drift {config.max_drift:.0%}); modules are judged as measured")
        return 1.0
    if abs(shift - 1) >= 0.01:
        warnings.append(f"machine drift: the modules moved by {shift - 1:+.1%} together (median over "
                        f"{len(logs)}); each module is judged against that shift")
    return shift


def _median_calls(per_step: list[Sample]) -> float:
    return median([s.calls for s in per_step])
