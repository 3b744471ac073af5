"""``python -m ddr_core.feature_concepts``: :func:`ddr_core.feature_concepts.cli.main`."""

from ddr_core.feature_concepts.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
