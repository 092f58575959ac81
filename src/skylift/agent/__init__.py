"""The agent: the updater daemon that runs on each device.

It uses :mod:`skylift.trust`, :mod:`skylift.bundle` and :mod:`skylift.chunks`
and never imports :mod:`skylift.hub` (an import-linter contract checks it).
"""
