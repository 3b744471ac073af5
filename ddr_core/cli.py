"""``ddr`` command line: browse and export what the pipeline computed.

::

    ddr inspect --data-root data [--experiment default] [--port 8501] [--host 127.0.0.1] [--no-token]
    ddr export-html --data-root data --variant tiny-raw --out report/ [--experiment default]
    ddr build-shards --data-root data --variant tiny-raw [--experiment default]

``inspect`` runs the Streamlit inspector (``ddr_core/inspector_app.py``, served by
``ddr_core/inspector_server.py`` behind :mod:`ddr_core.web_guard`) on the loopback interface unless
``--host`` says otherwise, with an access token: it prints ``http://127.0.0.1:8501/?token=...``, the URL to
open (``--no-token`` on a single-user machine; a fixed token from ``$DDR_ACCESS_TOKEN``). A taken port
fails at once, naming the port and ``--port``. ``python -m dagster_project.launcher inspector`` is the same.
``--data-root`` defaults to ``DDR_DATA_ROOT`` (else ``./data``) and ``--experiment`` to ``DDR_EXPERIMENT``
(else ``default``).

``export-html`` writes the report even when some entries are bad (an unreadable shard, a missing or refused
image, ...): it lists each problem on stderr and at the top of the report and then exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

INSPECTOR_APP = Path(__file__).with_name("inspector_app.py")
# the st.App that serves INSPECTOR_APP behind the web guard
INSPECTOR_SERVER = Path(__file__).with_name("inspector_server.py")


def inspector_command(data_root: str, experiment: str, host: str = "127.0.0.1", port: int = 8501,
                      headless: bool = True) -> list[str]:
    """The ``streamlit run`` command line of the inspector (behind the web guard; its token and allowed
    hosts come from ``$DDR_WEB_GUARD``, see :func:`run_inspector`)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(INSPECTOR_SERVER),
        "--server.address", host, "--server.port", str(port),
        "--server.headless", "true" if headless else "false",
        "--browser.gatherUsageStats", "false",
        # the app uses no "magic"; without it Streamlit compiles the script without building a Python
        # AST, which CPython 3.11.7 intermittently fails to do in Streamlit's thread
        "--runner.magicEnabled", "false",
        "--", "--data-root", str(Path(data_root).resolve()), "--experiment", experiment,
    ]


def run_inspector(data_root: str, experiment: str, host: str = "127.0.0.1", port: int = 8501, *,
                  token: bool = True, allow_hosts: tuple[str, ...] = (), open_browser: bool = False) -> int:
    """Start the guarded inspector and wait for it (``ddr inspect``, ``make inspect`` and
    ``python -m dagster_project.launcher inspector`` all come here). Returns the exit status."""
    from ddr_core.web_guard import (
        GUARD_ENV,
        GuardConfig,
        PortInUseError,
        port_is_free,
        resolve_token,
        wait_for_port,
    )

    try:
        guard = GuardConfig(bind_host=host, port=port, extra_hosts=allow_hosts,
                            token=resolve_token(token, host), service="the ddr inspector")
        port_is_free(host, port, what="the inspector")
    except (PortInUseError, ValueError) as exc:
        print(f"ddr inspect: {exc}", file=sys.stderr)
        return 2
    env = {**os.environ, GUARD_ENV: guard.model_dump_json()}
    env.pop("DDR_ACCESS_TOKEN", None)

    def stop(signum: int, _frame: object) -> None:  # SIGTERM (kill, systemd, a cluster's job end)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)  # before the child exists: it never outlives us
    process = subprocess.Popen(inspector_command(data_root, experiment, host, port), env=env)
    try:
        if wait_for_port(host, port, timeout_s=120, alive=lambda: process.poll() is None):
            # after Streamlit's own banner, whose URL lacks the token
            print(f"\nddr inspector: open {guard.url()}\n", file=sys.stderr, flush=True)
            if open_browser:
                import webbrowser

                webbrowser.open(guard.url())
        return process.wait()
    except KeyboardInterrupt:
        return 130
    finally:  # never leave Streamlit listening behind a stopped `ddr inspect`
        signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def add_guard_options(parser: argparse.ArgumentParser, default_port: int) -> None:
    """``--host``, ``--port``, ``--token/--no-token`` and ``--allow-host`` of a guarded web server."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port})")
    parser.add_argument("--token", action=argparse.BooleanOptionalAction, default=True,
                        help="require the access token printed at start (default: on; --no-token only "
                             "on a loopback host, for a single-user machine; $DDR_ACCESS_TOKEN fixes it)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME[:PORT]",
                        help="a further Host name the browser may use (e.g. localhost:8080 for an SSH "
                             "tunnel on another local port); repeatable")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=os.environ.get("DDR_DATA_ROOT", "data"),
                        help="data root (default: $DDR_DATA_ROOT or ./data)")
    parser.add_argument("--experiment", default=os.environ.get("DDR_EXPERIMENT", "default"),
                        help="experiment name (default: $DDR_EXPERIMENT or 'default')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddr", description="diffusion deep-dream research tools")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="run the Streamlit inspector")
    _common(inspect)
    add_guard_options(inspect, 8501)
    inspect.add_argument("--open-browser", action="store_true", help="open the inspector's URL in a browser")
    export = commands.add_parser("export-html", help="write a static HTML report of a variant")
    _common(export)
    export.add_argument("--variant", required=True)
    export.add_argument("--out", required=True, help="report folder")
    shards = commands.add_parser("build-shards", help="write the representation shards and index of a variant")
    _common(shards)
    shards.add_argument("--variant", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        try:
            import streamlit  # noqa: F401
        except ImportError:
            print("streamlit is not installed: pip install streamlit", file=sys.stderr)
            return 2
        return run_inspector(args.data_root, args.experiment, args.host, args.port, token=args.token,
                             allow_hosts=tuple(args.allow_host), open_browser=args.open_browser)

    from ddr_core.paths import DataLayout

    layout = DataLayout(Path(args.data_root), args.experiment)
    if args.command == "export-html":
        from ddr_core.html_export import write_html_report

        report = write_html_report(layout, args.variant, Path(args.out))
        for problem in report.problems:
            print(f"problem: {problem.text()}", file=sys.stderr)
        if report.problems:
            print(f"{len(report.problems)} problem(s), listed at the top of {report.index}", file=sys.stderr)
        print(report.index)
        return 1 if report.problems else 0
    from ddr_core.representation import representation_for_variant

    summary, index_path = representation_for_variant(layout, args.variant, log=lambda m: print(m, file=sys.stderr))
    print(index_path)
    return 1 if summary.n_errors else 0


if __name__ == "__main__":
    sys.exit(main())
