"""The ``tokserve`` command line: serve, bulk (app/bulk), and the training tools of app/train."""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.bulk.cli import add_subcommands as add_bulk_command
from app.config import Settings
from app.drain import GracefulServer
from app.model_tools import add_subcommands as add_model_commands
from app.train.cli import add_subcommands as add_training_commands


def stop_loading(signum: int, frame: FrameType | None) -> None:
    """SIGTERM while models load: exit at once. As a container's PID 1, Python would otherwise
    ignore it (the kernel drops signals PID 1 has no handler for) until the pod is killed."""
    raise SystemExit(128 + signum)


def serve(args: argparse.Namespace) -> int:
    """Run the HTTP server; flags override the TOKSERVE_ environment."""
    from app.main import create_app
    from app.registry import ModelLoadError, ModelRegistry

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    if args.model_dir:
        overrides["model_dir"] = args.model_dir
    settings = Settings(**overrides)
    signal.signal(signal.SIGTERM, stop_loading)  # uvicorn installs its own once it serves
    try:
        # an OTLP endpoint without the otel extra is refused here, as a bad model folder is
        app = create_app(settings)
        # loaded before the server starts, so a bad model folder is one line, not a traceback
        app.state.registry = ModelRegistry.load(settings)
    except (ModelLoadError, ValueError) as exc:
        print(f"tokserve: cannot start: {exc}", file=sys.stderr)
        return 2
    GracefulServer(server_config(app, settings), app).run()
    return 0


def server_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings from ours. In-flight requests get the whole TOKSERVE_DRAIN_TIMEOUT_S,
    fractions too: uvicorn waits ``asyncio.timeout(timeout_graceful_shutdown)``, though its
    type says int (a whole-second cut answered nothing to a request at 0.9 s)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=settings.drain_timeout_s,  # type: ignore[arg-type]
        timeout_keep_alive=settings.keep_alive_s,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve the model repository over HTTP")
    serve_cmd.add_argument("--host", help="default TOKSERVE_HOST or 127.0.0.1")
    serve_cmd.add_argument("--port", type=int, help="default TOKSERVE_PORT or 8000")
    serve_cmd.add_argument("--model-dir", help="colon-separated model directories")
    serve_cmd.set_defaults(handler=serve)
    add_bulk_command(commands)
    add_training_commands(commands)
    add_model_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
