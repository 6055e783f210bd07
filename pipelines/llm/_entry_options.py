"""The `options:` an llm entry of models.yaml takes."""

from __future__ import annotations

from runner.options import Options as BaseOptions


class Options(BaseOptions):
    # The Ollama backend serves the entry under this tag ("llama3.1:8b"); None or "" leaves the
    # entry to the transformers backend only (the Ollama one refuses to load it).
    ollama_tag: str | None = None
    # Ollama's keep_alive for the entry's model (seconds, or a duration such as "10m"). -1: the
    # model stays in the daemon until the runner's cache unloads it (keep_alive 0). int first, so
    # -1 reaches the daemon as -1, not -1.0.
    keep_alive: int | float | str = -1
