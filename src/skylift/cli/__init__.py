"""The ``skylift`` command."""
