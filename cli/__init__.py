"""The applications above the services and the library: the ``trainyard`` command line, the local stack
it starts (``trainyard up``) and ``make demo``. Imports run one way: ``cli`` -> ``services`` -> ``shared``."""
