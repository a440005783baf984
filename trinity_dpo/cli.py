"""The `trinity` command.

    trinity run --config examples/dpo_humanlike/dpo.yaml [dotted.key=value ...]

Parses, validates the whole configuration before anything heavy loads, and calls `train.run(cfg)`. A user error
(configuration or data) prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trinity", description="Offline DPO from a Trinity-RFT style config.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="train offline DPO as the config says")
    run_p.add_argument("--config", required=True, help="the Trinity-style YAML (dpo.yaml)")
    run_p.add_argument("overrides", nargs="*", help="dotted key=value settings that replace the file's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars would drown the run's own lines
    try:
        from .config_loader import load_config

        cfg = load_config(args.config, args.overrides)
        from . import train

        run_dir = train.run(cfg)
    except ConfigError as e:
        print(f"trinity: error: {e}", file=sys.stderr)
        return 2
    print(f"done: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
