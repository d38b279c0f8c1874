"""Only the optional C part lives here; everything else is in pyproject.toml.

The extension formats Chrome trace rows ~10x faster than Python. It is optional: where
no compiler is at hand the build goes on without it and the pure-Python writer is used.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("modtimeline.writers._chrome_rows", ["src/modtimeline/writers/_chrome_rows.c"],
                             optional=True)])
