"""Options shared by the ``hyperhuman`` subcommands (:mod:`hyperhuman.cli`, :mod:`hyperhuman.cli_distill`)."""

from __future__ import annotations

import argparse


def add_config_options(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"YAML config: a name in configs/ or a path (default: {default_config})",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set writer.max_samples=500 (repeatable)",
    )  # fmt: skip


def add_resume_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume", default=None, metavar="latest|PATH", help="continue from the latest checkpoint or a given one"
    )


def add_heldout_options(parser: argparse.ArgumentParser, model_help: str, runtime_help: str) -> None:
    """The options of the stages that read a model run and a held-out set (measure, evolve)."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--shards", required=True, help="HumanVerse shards: the held-out samples (first --num)")
    parser.add_argument("--num", type=int, default=16, help="held-out samples (default: 16)")
    parser.add_argument("--runtime", default="eager", choices=["eager", "compiled", "bf16"], help=runtime_help)
