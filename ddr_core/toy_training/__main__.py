"""``python -m ddr_core.toy_training``: :func:`ddr_core.toy_training.cli.main`."""

from ddr_core.toy_training.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
