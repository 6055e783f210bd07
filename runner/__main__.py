"""`python -m runner` / `runner`: start uvicorn with settings from the environment."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:
    from fastapi import FastAPI

    from runner.settings import Settings


class Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM after a graceful shutdown, so the process dies by the signal;
    container orchestrators read that as a crash. Here a graceful shutdown exits 0, and the
    app begins draining (app.state.begin_drain) the moment the signal arrives."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None] | None = None):
        super().__init__(config)
        self.on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.on_signal is not None and not self.should_exit:
            self.on_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# sysexits' EX_CONFIG: a runner that can never serve (its models' files missing or broken,
# or a budget too small for some pipeline) stops before it binds its port, so
# go-livepeer's Warm fails once with this log instead of re-creating a container that says
# ERROR for ever (go-livepeer#3105).
EXIT_MISSING_MODELS = 78


def refuse_to_start(problems: dict[str, list[str]], model_dir: Path) -> int:
    from runner.checkpoints import fetch_command

    log = logging.getLogger("runner")
    lines = [f"  {model}: {problem}" for model, found in problems.items() for problem in found]
    log.error("cannot serve: the files of %d warm model(s) are missing or broken in %s:\n%s\n"
              "download them with:\n  %s", len(problems), model_dir, "\n".join(lines),
              fetch_command(list(problems), model_dir))
    return EXIT_MISSING_MODELS


def refuse_budget(unservable: dict[str, str]) -> int:
    """A budget that could never serve a default-sized request of some pipeline: /health
    would say IDLE while that pipeline refused everything, so the runner does not start."""
    logging.getLogger("runner").error(
        "cannot serve: the memory budget is too small for %d pipeline(s):\n%s\nraise "
        "VRAM_BUDGET (or lower VRAM_RESERVE), or serve fewer pipelines in this process",
        len(unservable), "\n".join(f"  {why}" for why in unservable.values()))
    return EXIT_MISSING_MODELS


def main(argv: list[str] | None = None) -> None:
    from runner.settings import Settings

    args = sys.argv[1:] if argv is None else argv
    settings = Settings()
    if args == ["live-config"]:
        sys.exit(print_live_config(settings))
    if args:
        sys.exit(f"usage: python -m runner [live-config]; got {' '.join(args)}")
    logging.basicConfig(
        level=logging.DEBUG if settings.verbose_logging else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not settings.verbose_logging:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    settings.log_optimisation_flags()

    from runner.app import create_app

    app = create_app(settings)
    if problems := app.state.service.file_problems():
        sys.exit(refuse_to_start(problems, app.state.service.model_dir))
    if unservable := app.state.service.budget_problems():
        sys.exit(refuse_budget(unservable))
    Server(server_config(app, settings), on_signal=lambda: begin_drain(app)).run()
    # The models are unloaded and the port closed: what is left is the interpreter's own
    # teardown, whose full garbage collection walks every object torch, transformers and
    # diffusers made (about 2 s on 2 cores, measured in the image check), eating into the 8 s
    # go-livepeer waits after SIGTERM. Nothing left needs collecting: freeze it all instead.
    gc.freeze()


def begin_drain(app: FastAPI) -> None:
    """What SIGTERM starts before uvicorn waits for in-flight requests (app.py's drainer),
    once the lifespan has set it up."""
    begin = getattr(app.state, "begin_drain", None)
    if begin is not None:
        begin()


def print_live_config(settings: Settings) -> int:
    """The static `-liveRunnerConfig` entries for these settings, for an operator without
    dynamic registration to paste into go-livepeer's runners.json."""
    import json

    from runner.app import build_service
    from runner.live import static_config

    print(json.dumps(static_config(settings, build_service(settings)), indent=2))
    return 0


def server_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn as the runner serves: on SIGTERM it stops accepting, lets in-flight requests
    finish within the grace period, then the lifespan unloads every model; connections that
    send no request head in time, or exceed the cap, are closed (runner/connections.py)."""
    from runner.connections import protocol

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                          timeout_graceful_shutdown=settings.shutdown_grace_seconds,
                          http=protocol(settings.header_timeout, settings.max_connections))


if __name__ == "__main__":
    main()
