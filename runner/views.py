"""One base URL per served (pipeline, model), for go-livepeer.

go-livepeer lists a runner it does not start (an aiModels entry with a `url`) once per entry,
fetches `GET {url}/version` for each (ai/worker/container.go, NewRunnerContainer) and
advertises for the entry only a version whose `pipeline` and `model_id` equal the entry's
(ai/worker/utils.go, LowestVersion, called from cmd/livepeer/starter/starter.go). One `/version`
cannot name every pipeline and model of a runner serving several, so each has its own base URL:

    {base}/pipelines/{pipeline}             the pipeline and its default model
    {base}/pipelines/{pipeline}/{model_id}  the pipeline and one of its listed models

Under either, every route answers as at the root (go-livepeer's generated client appends each
route to the URL's path), and `/version` and `/hardware/*` name that pipeline and model. Same
process, cache and queues: only the names differ. The root is untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from runner.errors import error_body
from runner.registry import Registry

PREFIX = "/pipelines"
SCOPE_KEY = "runner.view"


@dataclass(frozen=True)
class View:
    pipeline: str
    model_id: str


def table(pipelines: list[str], registry: Registry) -> dict[str, View]:
    """Each base path this runner answers under -> the pipeline and model it names."""
    views: dict[str, View] = {}
    for name in pipelines:
        views[f"{PREFIX}/{name}"] = View(name, registry.default(name).id)
        for entry in registry.entries(name):
            views[f"{PREFIX}/{name}/{entry.id}"] = View(name, entry.id)
    return views


def of(scope: Mapping[str, Any]) -> View | None:
    """The view a request came in under; None at the root."""
    return scope.get(SCOPE_KEY)


class PipelineViews:
    """ASGI middleware: a request under a view's base path goes on with that prefix removed
    (everything after it sees the root's path) and the view in its scope; an unknown base
    under /pipelines/ is a 404 naming the ones served."""

    def __init__(self, app: ASGIApp, views: dict[str, View]):
        self.app = app
        self.views = views
        self.longest_first = sorted(views, key=len, reverse=True)

    def match(self, path: str) -> str | None:
        return next((base for base in self.longest_first if path.startswith(f"{base}/")), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(f"{PREFIX}/"):
            await self.app(scope, receive, send)
            return
        base = self.match(path)
        if base is None:
            await self._not_found(scope, receive, send)
            return
        rest = path[len(base):]
        await self.app({**scope, "path": rest, "raw_path": rest.encode(),
                        SCOPE_KEY: self.views[base]}, receive, send)

    async def _not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        bases = sorted({f"{PREFIX}/{view.pipeline}" for view in self.views.values()})
        answer = JSONResponse(error_body(
            f"{scope['path']} is under no served pipeline: this runner answers under "
            f"{', '.join(bases)}, each optionally followed by one of its listed model ids"),
            status_code=404)
        await answer(scope, receive, send)
