"""``ddr`` command line: browse and export what the pipeline computed.

::

    ddr inspect --data-root data [--experiment default] [--port 8501] [--host 127.0.0.1]
    ddr export-html --data-root data --variant tiny-raw --out report/ [--experiment default]
    ddr build-shards --data-root data --variant tiny-raw [--experiment default]

``inspect`` runs the Streamlit inspector (``ddr_core/inspector_app.py``) on the loopback interface
unless ``--host`` says otherwise. ``--data-root`` defaults to ``DDR_DATA_ROOT`` (else ``./data``) and
``--experiment`` to ``DDR_EXPERIMENT`` (else ``default``).

``export-html`` writes the report even when some entries are bad (an unreadable shard, a missing or refused
image, ...): it lists each problem on stderr and at the top of the report and then exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

INSPECTOR_APP = Path(__file__).with_name("inspector_app.py")


def inspector_command(data_root: str, experiment: str, host: str = "127.0.0.1", port: int = 8501,
                      headless: bool = True) -> list[str]:
    """The ``streamlit run`` command line of the inspector."""
    return [
        sys.executable, "-m", "streamlit", "run", str(INSPECTOR_APP),
        "--server.address", host, "--server.port", str(port),
        "--server.headless", "true" if headless else "false",
        "--browser.gatherUsageStats", "false",
        # the app uses no "magic"; without it Streamlit compiles the script without building a Python
        # AST, which CPython 3.11.7 intermittently fails to do in Streamlit's thread
        "--runner.magicEnabled", "false",
        "--", "--data-root", str(Path(data_root).resolve()), "--experiment", experiment,
    ]


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
    inspect.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    inspect.add_argument("--port", type=int, default=8501)
    inspect.add_argument("--open-browser", action="store_true", help="let Streamlit open a browser tab")
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
        command = inspector_command(args.data_root, args.experiment, args.host, args.port,
                                    headless=not args.open_browser)
        print(f"ddr inspector on http://{args.host}:{args.port}", file=sys.stderr)
        return subprocess.call(command)

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
