"""The directory ``memwatch run`` puts first on ``PYTHONPATH``: it holds ``sitecustomize.py``
only, so that nothing else of memwatch's can shadow a module of the application's."""
