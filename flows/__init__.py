"""Prefect layer: flows and tasks that orchestrate curation/ and training/, nothing more."""

import os

# A loaded 2-core machine can take longer than Prefect's default 20 s to start the temporary
# API server of a direct flow run; telemetry would only fail on machines without internet.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
