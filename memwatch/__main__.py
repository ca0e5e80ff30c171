"""``python -m memwatch``: the ``memwatch`` command (see :mod:`memwatch.cli`)."""

from memwatch.cli import main

raise SystemExit(main())
