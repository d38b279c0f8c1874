"""Analysis: what a trace says. ``reader`` (the analysis view of a trace: spans, steps,
samples), ``summary``, ``diff`` (the CI gate), ``by_rank`` (stragglers), ``merge`` (ranks
into one file), ``profiler`` (a torch.profiler trace joined), ``stats``, ``render``.
Never imports torch. The interface is the command line (``modtimeline summary``, ``diff``,
``merge``); the modules are not a documented Python API, so nothing is exported here."""
