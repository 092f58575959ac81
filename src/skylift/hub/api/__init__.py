"""The management API (docs/api.md, "Management API"), one route module per domain word.

Each module exposes ``routes(ctx)`` and is listed in
:data:`skylift.hub.app.API_MODULES`; :mod:`skylift.hub.api.common` holds what
they share (authorisation, strict bodies and queries, cursors, times).
"""
