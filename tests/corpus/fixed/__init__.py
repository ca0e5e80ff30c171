"""Fixed twins of the leaking corpus apps: each module is a copy of ``tests.corpus.<name>`` with
the change memwatch's advice names applied, as a user would apply it (see docs/advice.md). They
run under the same server and traffic as the leaking app (:func:`tests.corpus.catalog.fixed_twin`)
and must not be flagged. None imports its leaking original."""
