"""The web dashboard: server-rendered pages on the management port, for people.

Fleet overview, devices, releases, deployments with live rollout progress,
the audit log, provisioning keys and signer CAs (docs/dashboard.md). Pages
are Jinja2 templates; the only script (``static/dashboard.js``, written
here) refreshes live regions by short polling and counts the devices a
deployment would select while its form is filled in. Every page works
without it, only without live updates.

``routes(ctx)`` and ``background(ctx)`` make it a route module like the
API's; :func:`skylift.hub.app.make_api_app` mounts it at ``/``.
"""

from skylift.hub.dashboard.routes import background, not_found, routes

__all__ = ["background", "not_found", "routes"]
