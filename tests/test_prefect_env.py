"""flows/ changes nothing on import; Prefect's settings and log filters are applied by explicit calls.

Checked in a fresh interpreter, since what matters is the state a first import leaves behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, logging, os, sys
before = dict(os.environ)
import flows, flows.cli, flows.pipeline, flows.serve  # Prefect is imported by flows.pipeline
from flows.pipeline import _NoTracebackForUserErrors, quiet_user_errors
from flows.prefect_env import PREFECT_DEFAULTS, configure_prefect
from prefect.settings import get_current_settings

LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine")

def filters():
    return [sum(isinstance(f, _NoTracebackForUserErrors) for f in logging.getLogger(n).filters) for n in LOGGERS]

changed = {k: v for k, v in os.environ.items() if before.get(k) != v and k.startswith(("PREFECT_", "WINNOW_"))}
out = {"environ_changed": changed, "filters_on_import": filters()}
quiet_user_errors()
quiet_user_errors()
out["filters_after_two_calls"] = filters()
configure_prefect()
configure_prefect()
settings = get_current_settings()
out["timeout"] = settings.server.ephemeral.startup_timeout_seconds
out["analytics"] = settings.server.analytics_enabled
out["set"] = {k: os.environ.get(k) for k in PREFECT_DEFAULTS}
print(json.dumps(out))
"""


def _run(extra_env: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_")}
    env.update({"PREFECT_HOME": os.environ.get("PREFECT_HOME", str(Path.home() / ".prefect")), **extra_env})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_changes_nothing_and_configure_prefect_is_honoured_after_prefect_is_imported() -> None:
    out = _run({})
    assert out["environ_changed"] == {}, "importing flows must not set Prefect's (or Winnow's) variables"
    assert out["filters_on_import"] == [0, 0, 0, 0], "importing flows.pipeline must not attach log filters"
    assert out["filters_after_two_calls"] == [1, 1, 1, 1], "quiet_user_errors is idempotent"
    assert out["timeout"] == 120 and out["analytics"] is False
    assert out["set"] == {
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def test_a_users_own_prefect_setting_wins() -> None:
    out = _run({"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "33"})
    assert out["timeout"] == 33 and out["analytics"] is False
