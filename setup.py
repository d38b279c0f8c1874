"""Only the optional compiled parts live here; everything else is in pyproject.toml.

* ``modtimeline.writers._chrome_rows`` (C) formats Chrome trace rows ~10x faster.
* ``modtimeline.writers._pftrace_rows`` (C) encodes the .pftrace span packets.
* ``modtimeline.native._resolve_cpu`` (C++, no torch) pairs host-only events into spans.
* ``modtimeline.native._hotpath`` (C++ against torch's headers) is the Recorder's hot path:
  forward hooks and C++ autograd node pre-hooks. It needs torch at build time: the torch
  this interpreter imports, or, in pip's isolated build, the torch of the environment
  being installed into (``native/extensions.py`` finds it); without either it is left out, and
  ``modtimeline build`` builds it later for the torch installed then.

All are optional: where one cannot be built, the install goes on without it and the
pure-Python code does the same work, slower. Their definitions are in
``src/modtimeline/native/extensions.py``, shared with ``modtimeline build``.
"""

import importlib.util

from setuptools import setup

_spec = importlib.util.spec_from_file_location("_extension", "src/modtimeline/native/extensions.py")
assert _spec is not None and _spec.loader is not None
_extension = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_extension)

setup(ext_modules=_extension.extensions("src/modtimeline", prefix="src/modtimeline/"))
