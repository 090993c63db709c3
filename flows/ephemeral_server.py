"""Prefect's temporary API server for a direct flow run, as a child that dies with its parent.

Why: `winnow run` needs no server because Prefect starts a temporary one (a uvicorn
subprocess, ``prefect.server.api.server.SubprocessASGIServer``) and stops it from an
``atexit`` hook. A SIGTERM or SIGKILL skips ``atexit``, and the server lived on (~220 MB, a
port held) after every killed run. Here the run starts that server itself, before Prefect
would, from the main thread, with Linux's ``PR_SET_PDEATHSIG``: the kernel kills the server
when the process that started it dies, however it dies. Prefect keeps one instance per port
in a class-level registry, so every later ``SubprocessASGIServer()`` call inside Prefect gets
this one, already running. Elsewhere (not Linux, not the main thread, an API URL already set,
or a Prefect without that registry) nothing changes: Prefect starts its own as before.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from typing import Any

PR_SET_PDEATHSIG = 1
_libc_prctl: Any = None


def _prctl() -> Any:
    """libc's prctl, looked up in the parent: the child between fork and exec only calls it."""
    global _libc_prctl
    if _libc_prctl is None:
        _libc_prctl = ctypes.CDLL(None, use_errno=True).prctl
    return _libc_prctl


def die_with_parent_preexec() -> Any:
    """A Popen ``preexec_fn`` that has the kernel SIGKILL the child when this process dies."""
    prctl, parent = _prctl(), os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def start_owned_server() -> bool:
    """Start Prefect's temporary API server now, bound to this process's life; True if it did.

    Call it from the main thread before a flow runs; a no-op when an API URL is configured.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return False
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return False
    from prefect.server.api import server as prefect_server

    base = getattr(prefect_server, "SubprocessASGIServer", None)
    registry = getattr(base, "_instances", None)
    if base is None or not isinstance(registry, dict) or not hasattr(base, "_run_uvicorn_command"):
        return False
    existing = registry.get(None)
    if existing is not None:
        return isinstance(existing, _ChildServer) and bool(existing.running)
    server = _server_class(base)()
    server.start()
    return True


_ChildServer: Any = None


def _server_class(base: type) -> type:
    """SubprocessASGIServer whose uvicorn process carries the parent-death signal."""
    global _ChildServer
    if _ChildServer is not None:
        return _ChildServer

    class ChildServer(base):  # type: ignore[misc, valid-type]
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect 3.9's command and environment (SubprocessASGIServer._run_uvicorn_command),
            # plus the preexec_fn.
            import prefect
            from prefect.settings import get_current_settings

            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            return subprocess.Popen(
                args=[sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                      "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                      "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **server_env,
                     **get_current_settings().to_environment_variables(exclude_unset=True)},
                preexec_fn=die_with_parent_preexec(),  # noqa: PLW1509 - only a prctl call runs in the child
            )

    _ChildServer = ChildServer
    return ChildServer
