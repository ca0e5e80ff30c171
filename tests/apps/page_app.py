"""The leaking service of tests/apps/leaky_multiworker.py, for the report-page test.

The warm-up is shortened (500 requests instead of 2,000) so that the page test reaches a
suspected leak and a finished diagnosis window within seconds: it proves the page, not the
detector's tuning (tests/integration/test_detection_corpus.py does that at default settings).
"""

from __future__ import annotations

import memwatch
from tests.apps.leaky_multiworker import app as leaky_app

application = memwatch.wrap(leaky_app, warmup_requests=500)
