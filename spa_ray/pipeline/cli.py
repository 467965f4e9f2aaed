"""Command line of the SPA job: ``python jobs/spa_run.py [--config FILE] [key.sub=value ...]``."""

from __future__ import annotations

import argparse
import sys

from spa_ray.pipeline.config import ConfigError, load_config
from spa_ray.config.tree import reference_markdown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spa_run",
        description="Run SPA (Spread Preference Annotation) as one Ray job. "
        "With no arguments: the embedded task on this machine.",
    )
    parser.add_argument("--config", help="YAML config file (see clusters/presets/).")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config and exit.")
    parser.add_argument("--describe", action="store_true", help="Print every config key with its default and meaning (markdown).")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. run.iterations=3")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.describe:
        from spa_ray.pipeline.config import SPAConfig

        print(reference_markdown(SPAConfig))
        return 0
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"spa_run: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from spa_ray.pipeline.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        return 0
    from spa_ray.pipeline.driver import run_spa

    try:
        return run_spa(config)
    except _input_errors() as exc:  # bad data, model folder, placement: one line naming the source
        print(f"spa_run: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already names the file/row/field, path or config key at fault."""
    from spa_ray.data.errors import DataError
    from spa_ray.models.loading import MissingChatTemplateError, ModelLoadError
    from spa_ray.pipeline.run_dir import RunDirError
    from spa_ray.pipeline.stages import NotEnoughPairsError
    from spa_ray.tasks.base import TaskLoadError
    from spa_ray.training.worker import NonFiniteLossError

    return (
        ConfigError, DataError, ModelLoadError, MissingChatTemplateError, RunDirError, TaskLoadError,
        NotEnoughPairsError, NonFiniteLossError,
    )


if __name__ == "__main__":
    raise SystemExit(main())
