"""`python -m runner` / `runner`: start uvicorn with settings from the environment."""

from __future__ import annotations

import logging
import os


def main() -> None:
    from runner.settings import Settings

    settings = Settings()
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

    import uvicorn

    from runner.app import create_app

    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
