"""The ``rankwise`` command line."""
