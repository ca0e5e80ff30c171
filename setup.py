"""Only what setup.cfg cannot say: the optional C extension (metadata lives in setup.cfg).

``memwatch._speedups`` is the per-request recording path in C (``memwatch/recorder.py`` says
what it does). It is optional: where it cannot be compiled (no C compiler or Python headers)
the install goes on without it, and memwatch records through the pure-Python path, which gives
the same records.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("memwatch._speedups", sources=["memwatch/_speedups.c"], optional=True),
    ]
)
