"""The ``ckptfn`` command line: ``demo``, ``inspect`` and ``replay``."""
