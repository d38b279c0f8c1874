"""Spans: ``resolve`` turns the captured events (and device marks) into spans that nest
on their tracks (``format.TraceData``). No torch."""
