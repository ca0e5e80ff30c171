"""Small real applications that memwatch's middleware and server tests wrap.

Every module builds its app in a factory (no module-level wrapping), so that each test gets a
fresh app and a fresh memwatch instance. The ``wrapped_*`` factories are what the integration
tests hand to gunicorn (``module:factory()``) and uvicorn (``--factory``).
"""
