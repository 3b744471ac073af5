"""One launcher for ddr's long-running services: the guarded Dagster UI, the dagster-daemon, the inspector.

::

    python -m dagster_project.launcher dev  [--port 3000] [--read-only] [--no-token] ...   # UI + daemon
    python -m dagster_project.launcher ui   [--port 3000] [--read-only] ...                # UI only
    python -m dagster_project.launcher daemon                                              # daemon only
    python -m dagster_project.launcher inspector --data-root data [--port 8501] ...        # = ddr inspect

``make dev`` runs ``dev`` and ``make inspect`` runs ``inspector``. The UI is dagster-webserver's own
Starlette app (:class:`dagster_webserver.webserver.DagsterWebserver`, as the ``dagster-webserver`` CLI
builds it) wrapped in :class:`ddr_core.web_guard.WebGuard` and served by uvicorn on a socket bound before
the code location loads, so a taken port fails at once with the fix (``--port``). The guard refuses
GraphQL mutations sent as GET or as a POST that is not ``application/json``, a foreign ``Origin`` on a
state-changing request or the GraphQL WebSocket, a ``Host`` that is not this server (DNS rebinding), and,
with the access token (on by default), every request without it: open the printed
``http://127.0.0.1:3000/?token=...`` once; the browser keeps an HttpOnly SameSite=Strict cookie.
``--read-only`` serves dagster-webserver's read-only mode (no launching, no schedule toggles).

A bare ``dagster dev`` / ``dagster-webserver`` is NOT guarded.

The Dagster instance is ``$DAGSTER_HOME`` (required; the Makefile sets ``.dagster_home``), given this
project's ``dagster.yaml`` when it has none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from ddr_core.cli import add_guard_options, run_inspector
from ddr_core.shared_root import apply_umask_from_env
from ddr_core.web_guard import GuardConfig, PortInUseError, WebGuard, bind_listening_socket, resolve_token

LOGGER = logging.getLogger("ddr.launcher")
PROJECT_DAGSTER_YAML = Path(__file__).with_name("dagster.yaml")
DEFAULT_UI_PORT = 3000
DAEMON_STOP_TIMEOUT_S = 60
# dagster-webserver's CLI defaults (dagster_webserver/cli.py)
DB_STATEMENT_TIMEOUT_MS, DB_POOL_RECYCLE_S, DB_POOL_MAX_OVERFLOW = 15000, 3600, 20


class LaunchError(RuntimeError):
    """A service cannot start; the message names the cause and the fix."""


def dagster_home() -> Path:
    """``$DAGSTER_HOME``, created and given this project's ``dagster.yaml`` when it has none."""
    raw = os.environ.get("DAGSTER_HOME")
    if not raw:
        raise LaunchError("DAGSTER_HOME is not set: the UI and the daemon must share one instance. "
                          "`make dev` uses ./.dagster_home; or `export DAGSTER_HOME=$PWD/.dagster_home`")
    home = Path(raw).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and not (home / "dagster.yml").exists():
        shutil.copyfile(PROJECT_DAGSTER_YAML, home / "dagster.yaml")
    return home


def workspace_file(raw: str) -> Path:
    path = Path(raw).expanduser().resolve()
    if not path.is_file():
        raise LaunchError(f"workspace file {raw!r} does not exist: run from the repository root or pass "
                          "-w path/to/workspace.yaml")
    return path


@contextlib.contextmanager
def ui_process_context(instance: Any, workspace: Path, *, read_only: bool) -> Iterator[Any]:
    """dagster-webserver's WorkspaceProcessContext for ``workspace`` (loads the code location)."""
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster_webserver.version import __version__

    with WorkspaceProcessContext(instance, version=__version__, read_only=read_only,
                                 workspace_load_target=WorkspaceFileTarget(paths=[str(workspace)])) as context:
        yield context


def build_ui_app(process_context: Any, guard: GuardConfig, *, live_data_poll_rate: int = 2000,
                 lifespan: Callable[[Any], contextlib.AbstractAsyncContextManager[None]] | None = None,
                 ) -> WebGuard:
    """dagster-webserver's Starlette app for ``process_context``, behind :class:`WebGuard`."""
    from dagster_webserver.webserver import DagsterWebserver

    app = DagsterWebserver(process_context, "", live_data_poll_rate).create_asgi_app(lifespan=lifespan)
    return WebGuard(app, guard)


def _announcing_lifespan(url: str, read_only: bool) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        mode = " (read-only)" if read_only else ""
        print(f"\nddr Dagster UI{mode}: open {url}\n", file=sys.stderr, flush=True)
        try:
            yield
        except asyncio.CancelledError:  # uvicorn cancels the lifespan on Ctrl-C (as dagster-webserver's CLI)
            pass

    return lifespan


def ui_guard_config(args: argparse.Namespace) -> GuardConfig:
    return GuardConfig(bind_host=args.host, port=args.port, extra_hosts=tuple(args.allow_host),
                       token=resolve_token(args.token, args.host), service="the ddr Dagster UI")


def open_instance() -> Any:
    """The instance of ``$DAGSTER_HOME``; opening it creates its storage, so the UI opens it before the
    daemon starts (two processes creating a fresh SQLite storage at once race)."""
    from dagster import DagsterInstance

    dagster_home()
    return DagsterInstance.get()


def serve_ui(args: argparse.Namespace, guard: GuardConfig, sock: socket.socket, instance: Any,
             daemon: subprocess.Popen | None = None) -> int:
    """Serve the guarded UI on the bound ``sock`` until Ctrl-C (or until ``daemon`` exits)."""
    import uvicorn

    workspace = workspace_file(args.workspace)
    instance.optimize_for_webserver(DB_STATEMENT_TIMEOUT_MS, DB_POOL_RECYCLE_S, DB_POOL_MAX_OVERFLOW)
    daemon_died: list[int] = []
    with ui_process_context(instance, workspace, read_only=args.read_only) as context:
        app = build_ui_app(context, guard, live_data_poll_rate=args.live_data_poll_rate,
                           lifespan=_announcing_lifespan(guard.url(), args.read_only))
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.uvicorn_log_level))
        if daemon is not None:
            def watch() -> None:
                code = daemon.wait()
                if not server.should_exit:
                    daemon_died.append(code)
                    print(f"ddr dev: dagster-daemon exited with status {code}; stopping the UI (queued runs "
                          "would never start). Its log is above.", file=sys.stderr, flush=True)
                    server.should_exit = True

            threading.Thread(target=watch, name="daemon-watch", daemon=True).start()
        server.run(sockets=[sock])
    return 1 if daemon_died else 0


def daemon_command(workspace: Path) -> list[str]:
    """The dagster-daemon command line (as ``dagster dev`` starts it)."""
    return [sys.executable, "-m", "dagster._daemon", "run", "-w", str(workspace)]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=DAEMON_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print("ddr dev: dagster-daemon did not stop; killing it", file=sys.stderr)
        process.kill()
        process.wait()


def _bind_ui(args: argparse.Namespace) -> tuple[GuardConfig, socket.socket]:
    try:
        guard = ui_guard_config(args)
    except ValueError as exc:  # a refused --no-token, a malformed token or --allow-host
        raise LaunchError(str(exc)) from exc
    return guard, bind_listening_socket(args.host, args.port, what="the Dagster UI")


def cmd_ui(args: argparse.Namespace) -> int:
    guard, sock = _bind_ui(args)
    workspace_file(args.workspace)
    with open_instance() as instance:
        return serve_ui(args, guard, sock, instance)


def cmd_daemon(args: argparse.Namespace) -> int:
    dagster_home()
    command = daemon_command(workspace_file(args.workspace))
    os.execv(command[0], command)
    return 0  # not reached


def cmd_dev(args: argparse.Namespace) -> int:
    guard, sock = _bind_ui(args)  # a taken port fails before anything starts
    workspace = workspace_file(args.workspace)
    with open_instance() as instance:
        daemon = subprocess.Popen(daemon_command(workspace))
        try:
            return serve_ui(args, guard, sock, instance, daemon=daemon)
        finally:
            _stop(daemon)


def cmd_inspector(args: argparse.Namespace) -> int:
    return run_inspector(args.data_root, args.experiment, args.host, args.port, token=args.token,
                         allow_hosts=tuple(args.allow_host), open_browser=args.open_browser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dagster_project.launcher",
                                     description="start ddr's Dagster UI (guarded), dagster-daemon, inspector")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("dev", "the guarded Dagster UI and the dagster-daemon (make dev)"),
                            ("ui", "the guarded Dagster UI only")):
        sub = commands.add_parser(name, help=help_text)
        add_guard_options(sub, DEFAULT_UI_PORT)
        sub.add_argument("-w", "--workspace", default="workspace.yaml", help="workspace file (default ./workspace.yaml)")
        sub.add_argument("--read-only", action="store_true",
                         help="browse only: no launching, terminating, wiping or schedule toggles")
        sub.add_argument("--live-data-poll-rate", type=int, default=2000, help="UI poll rate in ms (default 2000)")
        sub.add_argument("--uvicorn-log-level", default="warning",
                         choices=["critical", "error", "warning", "info", "debug", "trace"])
        sub.set_defaults(run=cmd_dev if name == "dev" else cmd_ui)
    daemon = commands.add_parser("daemon", help="the dagster-daemon only (runs queued runs, schedules)")
    daemon.add_argument("-w", "--workspace", default="workspace.yaml")
    daemon.set_defaults(run=cmd_daemon)
    inspector = commands.add_parser("inspector", help="the inspector (Streamlit), as `ddr inspect`")
    inspector.add_argument("--data-root", default=os.environ.get("DDR_DATA_ROOT", "data"))
    inspector.add_argument("--experiment", default=os.environ.get("DDR_EXPERIMENT", "default"))
    add_guard_options(inspector, 8501)
    inspector.add_argument("--open-browser", action="store_true")
    inspector.set_defaults(run=cmd_inspector)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # uvicorn re-raises SIGTERM after its graceful shutdown; exiting through SystemExit (not the default
    # action, which kills at once) stops the code server and the daemon on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        apply_umask_from_env()  # DDR_UMASK: the services (and the processes they start) write group-shared files
    except ValueError as exc:
        print(f"ddr {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except (LaunchError, PortInUseError) as exc:
        print(f"ddr {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
