"""One module per pipeline; modules starting with `_` are shared helpers, not pipelines."""
