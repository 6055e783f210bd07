"""The `options:` a segment-anything-2 entry of models.yaml takes."""

from __future__ import annotations

from runner.options import Options as BaseOptions

DEFAULT_EMBEDDING_CACHE = 4  # images whose embeddings are kept (models.yaml `embedding_cache`)


class Options(BaseOptions):
    # Images whose embeddings are kept for further prompts on the same image; 0 keeps none.
    embedding_cache: int = DEFAULT_EMBEDDING_CACHE
    # sam2-pt: the hydra yaml and the .pt checkpoint in the snapshot, by file name; None: the
    # snapshot's only *.yaml / *.pt (more than one is a load error naming these options).
    config: str | None = None
    checkpoint: str | None = None
