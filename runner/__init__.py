"""The runner: a drop-in GPU worker for Livepeer-style AI pipelines."""

__version__ = "0.1.0"
