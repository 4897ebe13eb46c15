"""The ``meav`` command line: one thin module per command group over the library."""

from meav_merge.cli.main import build_parser, main  # noqa: F401
