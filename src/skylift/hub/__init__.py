"""The hub: device gateway, management API, dashboard, CA, TUF repositories.

It uses :mod:`skylift.trust`, :mod:`skylift.bundle` and :mod:`skylift.chunks`
and never imports :mod:`skylift.agent` (an import-linter contract checks it).
"""
