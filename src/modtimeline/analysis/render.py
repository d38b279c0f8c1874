"""Render summaries and diff reports: terminal tables, GitHub markdown, JSON."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

from .diff import IMPROVED, INCONCLUSIVE, REGRESSED, UNCHANGED, DiffReport, ModuleDiff
from .by_rank import RankView
from .summary import Summary

_COLORS = {REGRESSED: "\033[31m", IMPROVED: "\033[32m", INCONCLUSIVE: "\033[33m", UNCHANGED: ""}
_RESET = "\033[0m"
_MARKS = {REGRESSED: "🔴 regressed", IMPROVED: "🟢 improved", INCONCLUSIVE: "🟡 inconclusive", UNCHANGED: "unchanged"}


# Characters a module name may hold (``add_module`` accepts any string) that would let it
# rewrite a terminal (escape sequences) or a markdown page (new lines, HTML comments).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def plain(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``, ``\\n``): safe on a terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def markdown_code(text: str) -> str:
    """``text`` as one markdown code span that renders literally inside a table cell:
    control characters escaped, the fence longer than any run of backticks inside
    (``markdown_table`` escapes ``|``, on which tables split cells even inside code).
    Inside a code span ``<!--`` and ``#`` are shown as they are, never interpreted."""
    text = plain(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def use_color(stream: object = sys.stdout) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ


def _ms(us: float) -> str:
    return "–" if us == 0 else f"{us / 1000:.3f}"


def _signed_ms(us: float) -> str:
    return f"{us / 1000:+.3f}"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """Columns padded to their widest cell; ``right`` holds the right-aligned columns."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("─" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    def escape(cell: str) -> str:
        return cell.replace("|", "\\|")

    align = ["---:" if i in right else ":---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------- summary
def _summary_table(summary: Summary, indent: bool) -> tuple[list[str], list[list[str]], set[int]]:
    headers = ["module", "calls", "fwd ms", "fwd self", "bwd ms", "bwd self", "recompute ms"]
    if summary.has_gpu:
        headers += ["GPU fwd ms", "GPU bwd ms"]
    if summary.step_us:
        headers.append("% of step")
    levels = [r.depth if indent else 0 for r in summary.rows]
    rows = []
    for r, level in zip(summary.rows, levels):
        name = "  " * level + plain(r.fqn) + (" *" if r.approximate_calls else "")
        cells = [name, f"{r.calls:g}", _ms(r.total_us["forward"]), _ms(r.self_us["forward"]),
                 _ms(r.total_us["backward"]), _ms(r.self_us["backward"]), _ms(r.total_us["recompute"])]
        if summary.has_gpu:
            cells += [_ms(r.gpu_us.get("forward", 0.0)), _ms(r.gpu_us.get("backward", 0.0))]
        if summary.step_us:
            cells.append(f"{(r.share_of_step or 0) * 100:.1f}%")
        rows.append(cells)
    return headers, rows, set(range(1, len(headers)))


def _summary_header(summary: Summary) -> str:
    if not summary.steps_marked:
        return (f"{len(summary.rows)} modules, {summary.steps} trace(s) without steps marked (`with timeline.step():` "
                "marks them), each one step; times are mean ms per trace (self = minus nested modules)")
    step = f", mean step {summary.step_us / 1000:.3f} ms" if summary.step_us else ""
    return (f"{len(summary.rows)} modules, {summary.steps} step(s){step}; "
            "times are mean ms per step (self = minus nested modules)")


_APPROXIMATE_NOTE = ("* approximate: the backward end of some calls of this module could not be bounded by "
                     "their own work; their time is an upper bound")


def _approximate_note(summary: Summary) -> list[str]:
    return [_APPROXIMATE_NOTE] if any(r.approximate_calls for r in summary.rows) else []


def render_summary_text(summary: Summary, tree: bool = True) -> str:
    headers, rows, right = _summary_table(summary, indent=tree)
    return "\n".join([_summary_header(summary), "", text_table(headers, rows, right), *_approximate_note(summary)])


def render_summary_markdown(summary: Summary, tree: bool = True) -> str:
    headers, rows, right = _summary_table(summary, indent=False)
    levels = [r.depth if tree else 0 for r in summary.rows]
    for row, module, level in zip(rows, summary.rows, levels):
        row[0] = "&nbsp;&nbsp;" * level + markdown_code(module.fqn) + (" \\*" if module.approximate_calls else "")
    notes = "".join(f"\n\n\\{note}" for note in _approximate_note(summary))
    return f"**modtimeline summary**: {_summary_header(summary)}\n\n" + markdown_table(headers, rows, right) + notes


# -------------------------------------------------------------------------- diff
def _diff_cells(m: ModuleDiff, marks: dict[str, str]) -> list[str]:
    return [marks[m.verdict], plain(m.fqn), m.phase, m.device, _ms(m.base_us), _ms(m.candidate_us),
            _signed_ms(m.delta_us), f"{m.ratio - 1:+.1%}", _signed_ms(m.self_delta_us),
            _signed_ms(m.children_delta_us), f"{m.p_adjusted:.2g}", "; ".join(m.notes)]


_DIFF_HEADERS = ["verdict", "module", "phase", "device", "base ms", "cand ms", "Δ ms", "Δ %",
                 "self Δ ms", "children Δ ms", "p (adj.)", "notes"]
_DIFF_RIGHT = {4, 5, 6, 7, 8, 9, 10}


def _headline(report: DiffReport) -> str:
    counts = report.counts()
    words = ", ".join(f"{counts[v]} {v}" for v in (REGRESSED, IMPROVED, INCONCLUSIVE, UNCHANGED))
    if counts[REGRESSED]:
        verdict = "FAIL: slower beyond noise"
    elif report.cannot_judge is not None:
        return f"CANNOT JUDGE: {report.cannot_judge} ({words})"
    else:
        verdict = "OK: no module slower beyond noise"
    return f"{verdict} ({words})"


def render_diff_text(report: DiffReport, show_all: bool = False, color: bool = False, limit: int = 25) -> str:
    shown = [m for m in report.modules if show_all or m.verdict != UNCHANGED]
    hidden = 0
    if not show_all and len(shown) < limit:
        rest = [m for m in report.modules if m.verdict == UNCHANGED][: limit - len(shown)]
        shown += rest
    hidden = len(report.modules) - len(shown)
    marks = {v: v for v in _MARKS}
    rows = [_diff_cells(m, marks) for m in shown]
    table = text_table(_DIFF_HEADERS, rows, _DIFF_RIGHT)
    if color:
        lines = table.split("\n")
        for i, m in enumerate(shown):
            if _COLORS[m.verdict]:
                lines[i + 2] = _COLORS[m.verdict] + lines[i + 2] + _RESET
        table = "\n".join(lines)
    parts = [_headline(report), "", table]
    if hidden:
        parts.append(f"... {hidden} more unchanged module(s) (--all shows them)")
    parts += _structural_lines(report)
    parts += [f"warning: {plain(w)}" for w in report.warnings]
    parts.append(_settings_line(report))
    return "\n".join(parts)


def render_diff_markdown(report: DiffReport, limit: int = 50) -> str:
    """For a PR comment or $GITHUB_STEP_SUMMARY: changed modules first, by absolute Δ."""
    changed = [m for m in report.modules if m.verdict != UNCHANGED]
    unchanged = [m for m in report.modules if m.verdict == UNCHANGED]
    shown = changed + unchanged[: max(0, 10 - len(changed))]
    rows = [_diff_cells(m, _MARKS) for m in shown[:limit]]
    for row, module in zip(rows, shown):
        row[1] = markdown_code(module.fqn)
    parts = [f"### modtimeline diff: {_headline(report)}", "", markdown_table(_DIFF_HEADERS, rows, _DIFF_RIGHT)]
    if len(report.modules) > len(rows):
        parts.append(f"\n<sub>{len(report.modules) - len(rows)} more unchanged module(s) not shown.</sub>")
    if report.structural:
        parts += ["", "**Structural changes**", ""] + [
            f"- {markdown_code(s.fqn)} ({s.phase}, {s.device}): " + (
                f"calls per step {s.base_calls:g} -> {s.candidate_calls:g}" if s.change == "calls changed" else s.change)
            for s in report.structural]
    if report.warnings:
        parts += [""] + [f"> ⚠️ {_markdown_text(w)}" for w in report.warnings]
    parts += ["", f"<sub>{_settings_line(report)}</sub>"]
    return "\n".join(parts)


def _structural_lines(report: DiffReport) -> list[str]:
    if not report.structural:
        return []
    lines = ["", "structural changes:"]
    for s in report.structural:
        if s.change == "calls changed":
            lines.append(f"  - {plain(s.fqn)} ({s.phase}, {s.device}): calls per step {s.base_calls:g} -> {s.candidate_calls:g}")
        else:
            lines.append(f"  - {plain(s.fqn)} ({s.phase}, {s.device}): {s.change}")
    return lines


def _settings_line(report: DiffReport) -> str:
    c = report.config
    return (f"settings: Mann-Whitney U, {'Holm' if c.correction == 'holm' else 'Benjamini-Hochberg'} "
            f"correction, alpha {c.alpha}, threshold {c.default.threshold:.0%}, floor {c.default.floor_us:g} µs, "
            f"{c.warmup} warm-up step(s) left out; "
            f"{len(report.base_files)} base vs {len(report.candidate_files)} candidate trace(s)")


def _markdown_text(text: str) -> str:
    """Our own message text, which may quote a module name: one line, no HTML, no markup."""
    return re.sub(r"([\\`*_{}\[\]<>#|!])", r"\\\1", plain(text))


# ----------------------------------------------------------------------- by rank
def _rank_tables(view: RankView, code: bool) -> tuple[str, tuple[list[str], list[list[str]], set[int]],
                                                      tuple[list[str], list[list[str]], set[int]]]:
    def name(text: str) -> str:
        return markdown_code(text) if code else plain(text)

    slow = [r.rank for r in view.ranks if r.slow]
    head = (f"{len(view.ranks)} ranks; a rank is slow when its median step is more than {view.threshold:.0%} above "
            f"the median over ranks: " + (", ".join(f"rank {r}" for r in slow) + " slow" if slow else "none is"))
    if not any(r.step_us is not None for r in view.ranks):
        head += " (no steps marked: no step times to compare; mark steps with `with timeline.step():`)"
    rank_rows = [[str(r.rank), name(r.hostname), str(r.steps), "–" if r.step_us is None else f"{r.step_us / 1000:.3f}",
                  "–" if r.gap is None else f"{r.gap:+.1%}", "yes" if r.slow else ""] for r in view.ranks]
    ranks = (["rank", "host", "steps", "median step ms", "vs median", "slow"], rank_rows, {0, 2, 3, 4})
    module_rows = [[name(m.fqn), m.phase, f"{m.median_us / 1000:.3f}", f"{m.max_us / 1000:.3f}", str(m.slowest_rank),
                    f"{m.spread:.2f}x", "yes" if m.uneven else ""] for m in view.modules]
    modules = (["module", "phase", "median ms", "slowest ms", "slowest rank", "spread", "uneven"], module_rows,
               {2, 3, 4, 5})
    return head, ranks, modules


def _uneven_rule(view: RankView) -> str:
    return (f"uneven: the slowest rank more than {view.uneven_threshold:.0%} and {view.uneven_floor_us:g} µs per step "
            "above the median over ranks (--uneven-threshold, --uneven-floor-us)")


def render_by_rank_text(view: RankView) -> str:
    head, ranks, modules = _rank_tables(view, code=False)
    return "\n".join([head, "", text_table(*ranks), "",
                      "per module, median ms per step on each rank (widest spread first):", "", text_table(*modules),
                      _uneven_rule(view)])


def render_by_rank_markdown(view: RankView) -> str:
    head, ranks, modules = _rank_tables(view, code=True)
    return "\n".join(["### modtimeline: ranks side by side", "", head, "", markdown_table(*ranks), "",
                      "Per module, median ms per step on each rank (widest spread first):", "",
                      markdown_table(*modules), "", f"<sub>{_markdown_text(_uneven_rule(view))}</sub>"])
