"""Trace analysis: read traces, summarise them, compare them. Never imports torch."""

from .diff import DiffConfig, DiffReport, Rule, diff, load_config
from .reader import Trace, read_trace, samples, trace_files
from .summary import Summary, summarize

__all__ = [
    "DiffConfig", "DiffReport", "Rule", "Summary", "Trace",
    "diff", "load_config", "read_trace", "samples", "summarize", "trace_files",
]
