"""Compare per-step module timings of two sets of traces and give each module a verdict.

A module (FQN, phase, device) *regressed* only when all three agree:

* a rank test (Mann-Whitney U on per-step inclusive times), corrected for testing
  every module at once (Holm by default, or Benjamini-Hochberg), is significant;
* the median got slower by more than a relative threshold (default 5 %);
* and by more than an absolute floor (default 20 µs per step), so tiny modules whose
  relative noise is large never fail a build.

A change past both thresholds without significance is *inconclusive* (too noisy or
too few steps), never a silent pass. Thresholds can be set per FQN glob.
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TraceFormatError
from .reader import Key, Sample, Trace, samples
from .stats import benjamini_hochberg, holm, mann_whitney_u, median, relative_spread

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
        raise TraceFormatError("reading a TOML config needs Python 3.11 or newer")
    config = base or DiffConfig()
    try:
        document = tomllib.loads(Path(path).read_text())
    except OSError as error:
        raise TraceFormatError(f"{path}: cannot read config: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise TraceFormatError(f"{path}: invalid TOML: {error}") from None
    section = document.get("diff", {})
    known = {"threshold", "floor_us", "alpha", "correction", "warmup", "min_samples", "noisy_spread", "module"}
    unknown = set(section) - known
    if unknown:
        raise TraceFormatError(f"{path}: unknown [diff] settings: {', '.join(sorted(unknown))}")
    try:
        config.alpha = float(section.get("alpha", config.alpha))
        config.correction = str(section.get("correction", config.correction))
        config.warmup = int(section.get("warmup", config.warmup))
        config.min_samples = int(section.get("min_samples", config.min_samples))
        config.noisy_spread = float(section.get("noisy_spread", config.noisy_spread))
        config.default = Rule("*", float(section.get("threshold", config.default.threshold)),
                              float(section.get("floor_us", config.default.floor_us)))
        for entry in section.get("module", []):
            if "match" not in entry:
                raise TraceFormatError(f"{path}: every [[diff.module]] needs a match = \"FQN glob\"")
            config.rules.append(Rule(str(entry["match"]), float(entry.get("threshold", config.default.threshold)),
                                     float(entry.get("floor_us", config.default.floor_us)), bool(entry.get("ignore", False))))
    except (TypeError, ValueError) as error:
        raise TraceFormatError(f"{path}: bad value in [diff]: {error}") from None
    if config.correction not in ("holm", "bh"):
        raise TraceFormatError(f"{path}: correction must be 'holm' or 'bh', not {config.correction!r}")
    return config


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

    structural: list[StructuralChange] = []
    for key in sorted(set(base_samples) - set(candidate_samples)):
        structural.append(StructuralChange(*key, "removed", _median_calls(base_samples[key]), 0))
    for key in sorted(set(candidate_samples) - set(base_samples)):
        structural.append(StructuralChange(*key, "added", 0, _median_calls(candidate_samples[key])))

    rows: list[ModuleDiff] = []
    tested: list[int] = []
    warnings: list[str] = []
    noisy: list[str] = []
    for key in common:
        rule = config.rule_for(key[0])
        if rule.ignore:
            continue
        a, b = base_samples[key], candidate_samples[key]
        base_calls, candidate_calls = _median_calls(a), _median_calls(b)
        if base_calls != candidate_calls:
            structural.append(StructuralChange(*key, "calls changed", base_calls, candidate_calls))
        a_us = [s.inclusive_ns / 1000 for s in a]
        b_us = [s.inclusive_ns / 1000 for s in b]
        base_median, candidate_median = median(a_us), median(b_us)
        self_delta = median([s.self_ns / 1000 for s in b]) - median([s.self_ns / 1000 for s in a])
        delta = candidate_median - base_median
        row = ModuleDiff(*key, UNCHANGED, base_median, candidate_median, delta,
                         candidate_median / base_median if base_median else float("inf"),
                         self_delta, delta - self_delta, 1.0, 1.0, len(a), len(b))
        if len(a) < config.min_samples or len(b) < config.min_samples:
            row.verdict = INCONCLUSIVE
            row.notes.append(f"too few steps ({len(a)} vs {len(b)}; need {config.min_samples})")
        else:
            row.p_value = mann_whitney_u(a_us, b_us)
            tested.append(len(rows))
            spread = max(relative_spread(a_us), relative_spread(b_us))
            if spread > config.noisy_spread and base_median > rule.floor_us:
                row.notes.append(f"noisy: per-step spread {spread:.0%}")
                noisy.append(key[0])
        rows.append(row)

    adjust = holm if config.correction == "holm" else benjamini_hochberg
    for index, p_adjusted in zip(tested, adjust([rows[i].p_value for i in tested])):
        row = rows[index]
        row.p_adjusted = p_adjusted
        rule = config.rule_for(row.fqn)
        practical = abs(row.delta_us) > rule.floor_us and abs(row.ratio - 1) > rule.threshold
        if practical and p_adjusted < config.alpha:
            row.verdict = REGRESSED if row.delta_us > 0 else IMPROVED
        elif practical:
            row.verdict = INCONCLUSIVE
            row.notes.append(f"{row.ratio - 1:+.1%} but not significant (p={p_adjusted:.2g} after correction)")

    steps_base = min((len(v) for v in base_samples.values()), default=0)
    steps_candidate = min((len(v) for v in candidate_samples.values()), default=0)
    if min(steps_base, steps_candidate) < config.min_samples:
        warnings.append(f"few steps per side after warm-up (base {steps_base}, candidate {steps_candidate}): "
                        f"verdicts need at least {config.min_samples}; record more steps")
    if noisy:
        warnings.append(f"{len(noisy)} module(s) with noisy per-step times (spread > {config.noisy_spread:.0%}), "
                        f"e.g. {noisy[0]}: interleave base and candidate runs on one machine")
    rows.sort(key=lambda r: -abs(r.delta_us))
    return DiffReport(rows, structural, warnings, [str(t.path) for t in base], [str(t.path) for t in candidate], config)


def _median_calls(per_step: list[Sample]) -> float:
    return median([s.calls for s in per_step])
