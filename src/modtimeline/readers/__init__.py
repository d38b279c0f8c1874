"""Readers: one decoder per file format into one trace model (``decoding.TraceFile``, a
``format.TraceData`` per rank): ``chrome`` (.json, .json.gz), ``pftrace`` (.pftrace);
``load`` picks by the file. Never imports torch."""
