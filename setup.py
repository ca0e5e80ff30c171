"""Only what setup.cfg cannot say: the optional C extension (metadata lives in setup.cfg).

``memwatch._speedups`` is the per-request recording path in C (``memwatch/recorder.py`` says
what it does). It is optional: where it cannot be compiled (no C compiler or Python headers)
the install goes on without it, and memwatch records through the pure-Python path, which gives
the same records.
"""

import sys

from setuptools import Extension, setup

# On Linux (GCC and Clang, ELF): calls into libpython through the GOT rather than the PLT's
# stubs, which on the request path were code lines of their own to fetch: about 18 fewer L1
# instruction-cache misses per request (benchmarks/instructions.py --cache-sim; see
# docs/performance.md).
compile_args = ["-fno-plt"] if sys.platform.startswith("linux") else []

setup(
    ext_modules=[
        Extension(
            "memwatch._speedups",
            sources=["memwatch/_speedups.c"],
            optional=True,
            extra_compile_args=compile_args,
        ),
    ]
)
