"""The `gradserve` command: `serve` a model, `loadtest` a server, `train` the bundled model."""

from __future__ import annotations

import argparse
import sys

from gradserve.server import config as cfg
from gradserve.server import logs
from gradserve.server import loop as event_loop


def loadtest_module():
    from gradserve.client import loadtest

    return loadtest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over gRPC")
    cfg.add_arguments(serve)
    loadtest = sub.add_parser("loadtest", help="load-test a running server (client only)")
    loadtest_module().add_arguments(loadtest)
    train = sub.add_parser("train", help="retrain the bundled models (deterministic)")
    train.add_argument(
        "--out", default=str(cfg.BUNDLED_DIR), help="folder to write the .keras files to"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(getattr(args, "log_format", "text"), getattr(args, "log_level", "INFO"))
    if args.command == "loadtest":
        return loadtest_module().main(args)
    if args.command == "train":
        from pathlib import Path

        from gradserve.server.engine.train import train_bundled

        for name, fit in train_bundled(Path(args.out)).items():
            print(f"trained {Path(args.out) / name}.keras ({fit})")
        return 0
    try:
        from gradserve.server.app import serve
    except ImportError as exc:
        print(f"gradserve serve needs the server extra: pip install 'gradserve[server]' ({exc})")
        return 2
    try:
        config = cfg.from_namespace(args)
    except ValueError as error:
        print(f"gradserve serve: {error}", file=sys.stderr)
        return 2
    frontends = config.frontend_count()
    if frontends > 1:
        from gradserve.server import frontend
        from gradserve.server.engine.startup import open_repository
        from gradserve.server.multiproc import supervisor

    from gradserve.server.core.errors import StartRefused

    try:
        if frontends > 1:
            return supervisor.serve(config, frontends, load=open_repository,
                                    frontend=frontend.run)  # fmt: skip
        event_loop.run(serve(config))
    except StartRefused as refusal:
        print(f"gradserve serve: {refusal}", file=sys.stderr)
        return refusal.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
