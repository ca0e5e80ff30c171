"""The detection corpus: real web apps with known leaks (and clean ones), for memwatch's
end-to-end acceptance test and the requests-to-detect benchmark.

- one module per app (its ``app`` is ``memwatch.wrap(...)`` of a Flask, Django, Starlette,
  FastAPI or bare WSGI app at default settings), described in :mod:`tests.corpus.catalog`;
- :mod:`tests.corpus.traffic`: seeded random traffic, keep-alive clients, report polling;
- :mod:`tests.corpus.servers`: gunicorn sync / gthread and uvicorn, one worker each;
- :mod:`tests.corpus.harness`: one case end to end, judged;
- :mod:`tests.corpus.inprocess`: the same traffic without a server (soak, leak sizes).

See docs/detection.md.
"""
