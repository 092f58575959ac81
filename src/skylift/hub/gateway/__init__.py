"""The device gateway: mutual-TLS endpoints under ``/device/v1`` (docs/api.md).

- :mod:`~skylift.hub.gateway.routes`: the routes and background loops ``app.py`` mounts;
- :mod:`~skylift.hub.gateway.identity`: client certificate -> device, revocation-aware;
- :mod:`~skylift.hub.gateway.poll`: ETags from memory, batched last-seen writes;
- :mod:`~skylift.hub.gateway.enroll`, :mod:`~skylift.hub.gateway.reports`,
  :mod:`~skylift.hub.gateway.content`: the other endpoints;
- :mod:`~skylift.hub.gateway.state`: the per-process caches and how they stay true.

Other hub modules call :func:`invalidate` after changing what a device must
install, or revoking or deleting it, so that this process answers its next
request afresh; other processes learn it from the database within about a
second.
"""

from __future__ import annotations

from skylift.hub.gateway.state import invalidate

__all__ = ["invalidate"]
