"""Winnow's defaults for Prefect's settings, applied by one explicit call, never on import.

Why these: a loaded 2-core machine can take longer than Prefect's default 20 s to start the
temporary API server of a direct flow run, and telemetry would only fail on machines without
internet. A user's own value of either variable wins.

When: :func:`configure_prefect` runs in the CLI entry point (:func:`flows.cli.main`, before
anything imports Prefect), and in :func:`flows.pipeline.run_flow` and
:func:`flows.serve.serve_deployments` before Prefect starts a server. Prefect reads its settings
from the environment into a global settings context when ``prefect.context`` is first imported
(``prefect.context.GLOBAL_SETTINGS_CONTEXT``), not lazily at each use; so when Prefect is
already imported, the call refreshes that context with Prefect's own
``refresh_global_settings_context`` (what Prefect does after its plugins set variables).
The server subprocess inherits ``os.environ`` either way.
"""

from __future__ import annotations

import os
import sys

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def configure_prefect() -> None:
    """Set :data:`PREFECT_DEFAULTS` where the environment does not; idempotent."""
    changed = False
    for name, value in PREFECT_DEFAULTS.items():
        if name not in os.environ:
            os.environ[name] = value
            changed = True
    if changed and "prefect.context" in sys.modules:
        import prefect.context

        refresh = getattr(prefect.context, "refresh_global_settings_context", None)
        if refresh is not None:
            refresh()
        else:  # Prefect before 3.5: what that function does
            prefect.context.GLOBAL_SETTINGS_CONTEXT = prefect.context.root_settings_context()
