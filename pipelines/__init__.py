"""One module (or package) per pipeline; modules starting with `_` are shared helpers, not
pipelines."""
