"""A double of go-livepeer as the caller of a runner: the rules its source applies to what a
runner answers, written here from the facts of go-livepeer master (our own code):

- `ContainerWatch`: ai/worker/docker.go and container.go, a managed container's life. The first
  health check polls every 0.5 s until a 200 whose status is not ERROR (3 minutes at most); a
  warm container that first says LOADING is borrowed out of the pool and handed back only when
  /health says IDLE (OK never hands it back). Then /health every 5 s: a transport error or a
  non-200 is a failure, ERROR is two at once, LOADING for longer than 3 minutes is one per
  check; OK and IDLE reset the count; two failures destroy the container, and a warm one is
  re-created once.
- `worker_result`: ai/worker/runner.gen.go and worker.go, how an answer on a generate route
  becomes a result or an error. The generated client decodes a JSON body only for the statuses
  the contract lists for the route (tests/fixtures/contract/openapi.yaml); for any other status
  it returns nothing and no error, and the orchestrator then dereferences the nil result
  (go-livepeer#4026) or, on /llm without streaming, answers its own client "200 null". On /llm
  the worker reads only 400, 401 and 500 (a decoded 422 is ignored too).
- `read_llm_stream`: worker.go's SSE reader and server/ai_http.go's relay. Each line loses its
  `data: ` prefix; empty lines are skipped, `[DONE]` ends nothing (the reader runs to EOF), and
  anything else must be an LLMResponse JSON or it is logged as a decode error. The relay reads
  `choices[0]` of every chunk (an empty list panics it) and stops after the first chunk whose
  finish_reason is not empty.
- `billed_pixels`: server/ai_http.go, what a text-to-image request is charged for.
- `parse_ai_models`: core/ai.go, the aiModels.json an operator writes.
- `compatible`: core/capabilities.go, a gateway's -aiMinRunnerVersion against the version a
  runner reports (Masterminds semver, pre-release stripped from both, build metadata ignored).
- `advertised_versions`: cmd/livepeer/starter/starter.go over the aiModels entries with a
  `url`: each is an external container (ai/worker/worker.go Warm, container.go
  NewRunnerContainer: /health until ready, then GET /version, kept as the runner sent it), and
  the entry advertises `LowestVersion` (ai/worker/utils.go) of every container's version whose
  pipeline and model_id equal the entry's, exactly. `client_url` is how the generated client
  (runner.gen.go, oapi-codegen) joins a server URL and a route: a path in the URL is kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from fractions import Fraction
from urllib.parse import urljoin

import httpx

from tests.support.contract import contract

CONTAINER_TIMEOUT = 180.0  # containerTimeout
POLL_INTERVAL = 0.5  # pollingInterval, of the first health check
WATCH_INTERVAL = 5.0  # containerWatchInterval
MAX_FAILURES = 2  # maxHealthCheckFailures
STOP_TIMEOUT = 8.0  # containerStopTimeout: SIGKILL after this


# -- the container manager ------------------------------------------------------------------

@dataclass
class Health:
    """One /health answer as the manager sees it: a status code and the decoded `status`, or
    `error` for a transport failure (refused, timed out)."""

    code: int = 200
    status: str = ""
    error: str = ""

    @classmethod
    def of(cls, response) -> Health:
        """From an httpx/TestClient response; a non-JSON 200 decodes to nothing."""
        if "json" not in response.headers.get("content-type", ""):
            return cls(code=response.status_code)
        return cls(code=response.status_code, status=response.json().get("status", ""))


@dataclass
class ContainerWatch:
    """One managed container. Feed it /health answers with the time they were read."""

    warm: bool
    in_pool: bool = False
    borrowed: bool = False
    destroyed: bool = False
    recreated: int = 0
    failures: int = 0
    loading_since: float | None = None
    events: list[str] = field(default_factory=list)

    def first_check(self, at: float, health: Health) -> bool | None:
        """One poll of runnerWaitUntilReady, `at` seconds after the container started: True
        (ready) at the first 200 whose status is not ERROR, False (Warm fails) at ERROR or after
        3 minutes, None: poll again in POLL_INTERVAL."""
        if at > CONTAINER_TIMEOUT:
            self.events.append("first check: timed out waiting for runner")
            return False
        if health.error or health.code != 200:
            return None
        if health.status == "ERROR":
            self.events.append("first check: runner is in error state")
            return False
        if not health.status:  # a 200 it cannot decode: a nil dereference
            raise AssertionError("/health answered 200 without a JSON status")
        self.in_pool = True
        if self.warm and health.status == "LOADING":
            self.borrowed = True  # held until IDLE
            self.loading_since = at
        self.events.append(f"first check: {health.status}")
        return True

    def tick(self, at: float, health: Health) -> None:
        """One turn of watchContainer."""
        if self.destroyed:
            return
        if health.error or health.code != 200:
            self.failures += 1
        elif health.status == "IDLE":
            self.borrowed = False
            self.failures, self.loading_since = 0, None
        elif health.status == "OK":
            self.failures, self.loading_since = 0, None
        elif health.status == "LOADING":
            if self.loading_since is None:
                self.failures, self.loading_since = 0, at
                self.borrowed = True
            elif at - self.loading_since > CONTAINER_TIMEOUT:
                self.failures += 1
        elif health.status == "ERROR":
            self.failures = MAX_FAILURES  # "restarting immediately"
        else:
            self.events.append(f"unknown container status {health.status!r}")
        if self.failures >= MAX_FAILURES:
            self.destroyed = True
            self.recreated += 1 if self.warm else 0
            self.events.append(f"destroyed at {at:.0f} s after {health}")

    @property
    def serves(self) -> bool:
        """In the pool and free to take a job."""
        return self.in_pool and not self.borrowed and not self.destroyed


# -- the generated client and the worker -------------------------------------------------------

COMMON = frozenset({200, 400, 401, 422, 500})  # every generate route of the contract


def decoded(path: str) -> frozenset[int]:
    """The statuses the generated client decodes on a route: the contract's for it (a test
    pipeline's route: what every generate route has in common)."""
    route = contract()["paths"].get(path.rstrip("/") or path)
    if route is None:
        return COMMON
    ((_, operation),) = route.items()
    return frozenset(int(status) for status in operation["responses"])


def read_by_worker(path: str) -> frozenset[int]:
    """The decoded statuses the worker turns into a result or an error on a route."""
    statuses = decoded(path)
    return statuses - {422} if path.rstrip("/") == "/llm" else statuses


@dataclass
class Result:
    kind: str  # "result" | "error" | "nil"
    detail: str = ""


def worker_result(path: str, response) -> Result:
    """What go-livepeer's worker makes of a runner's answer to a (non-streamed) request. "nil"
    is the answer it cannot survive: a nil result without an error."""
    status = response.status_code
    is_json = "json" in response.headers.get("content-type", "")
    if not is_json or status not in read_by_worker(path):
        return Result("nil", f"{status} {response.headers.get('content-type')}")
    body = response.json()
    if status == 200:
        return Result("nil", "200 null") if body is None else Result("result")
    if status == 422:
        return Result("error", json.dumps(body))
    if not (isinstance(body, dict) and isinstance(body.get("detail"), dict)
            and isinstance(body["detail"].get("msg"), str)):
        raise AssertionError(f"{status} body is not the HTTPError envelope: {body}")
    return Result("error", f"{path.strip('/')} container returned {status}: "
                           f"{body['detail']['msg']}")


def survives(path: str, response) -> Result:
    result = worker_result(path, response)
    assert result.kind != "nil", f"go-livepeer cannot decode {path}'s answer: {result.detail}"
    return result


def billed_pixels(text_to_image: dict) -> int:
    """What the orchestrator charges a text-to-image request for (server/ai_http.go): its
    size, 512x512 where it gives none, times its images."""
    return (text_to_image.get("height") or 512) * (text_to_image.get("width") or 512) * \
        (text_to_image.get("num_images_per_prompt") or 1)


# -- the LLM stream ------------------------------------------------------------------------

@dataclass
class LLMStream:
    chunks: list[dict]  # every chunk the worker decoded, in order
    decode_errors: list[str]  # lines the worker logged as "Error unmarshaling stream data"
    relayed: list[dict]  # what the orchestrator wrote to its client before it stopped


def read_llm_stream(text: str) -> LLMStream:
    """worker.go's reader, then ai_http.go's relay, over a whole SSE body."""
    chunks, errors = [], []
    for line in text.splitlines():
        data = line.removeprefix("data: ")
        if data == "" or data == "[DONE]":
            continue
        try:
            chunks.append(json.loads(data))
        except ValueError:
            errors.append(line)
    relayed = []
    for chunk in chunks:
        choices = chunk.get("choices") or []
        assert choices, f"a chunk without choices panics the orchestrator: {chunk}"
        relayed.append(chunk)
        if choices[0].get("finish_reason"):
            break
    return LLMStream(chunks, errors, relayed)


# -- aiModels.json ---------------------------------------------------------------------------

class ConfigError(ValueError):
    pass


def _rat(value, key: str) -> Fraction:
    """JSONRat: big.Rat.SetString on the raw JSON token, so a number and nothing else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: value is not a number: {json.dumps(value)}")
    return Fraction(str(value))


TYPES = {"pipeline": str, "model_id": str, "url": str, "token": str, "warm": bool,
         "capacity": int, "gateway": str, "currency": str}


def parse_ai_models(text: str) -> list[dict]:
    """ParseAIModelConfigs for a file: typed fields, prices as numbers, optimization_flags
    values bool or string; then the starter's price checks (on a network)."""
    entries = json.loads(text)
    if not isinstance(entries, list):
        raise ConfigError("aiModels must be a JSON array")
    for entry in entries:
        for key, kind in TYPES.items():
            value = entry.get(key)
            if value is not None and (not isinstance(value, kind) or
                                      (kind is int and isinstance(value, bool))):
                raise ConfigError(f"{key}: cannot unmarshal {json.dumps(value)}")
        for key in ("price_per_unit", "pixels_per_unit"):
            if key in entry:
                entry[key] = _rat(entry[key], key)
        for name, value in (entry.get("optimization_flags") or {}).items():
            if not isinstance(value, bool | str):
                raise ConfigError(f"optimization_flags.{name}: must be a bool or a string")
        if entry.get("price_per_unit", 0) < 0:
            raise ConfigError("price must be >= 0")
        pixels = entry.get("pixels_per_unit", Fraction(1))
        if pixels <= 0 or pixels.denominator != 1:
            raise ConfigError("pixels_per_unit must be a positive integer")
    return entries


# -- runner versions -------------------------------------------------------------------------

SEMVER = re.compile(r"v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?")


def semver(text: str) -> tuple[int, int, int]:
    """The comparable part of a version as go-livepeer reads it: pre-release stripped (it
    treats suffixes as post-release), build metadata ignored."""
    match = SEMVER.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid semantic version {text!r}")
    return tuple(int(part or 0) for part in match.groups()[:3])


def compatible(min_version: str, runner_version: str) -> bool:
    """isVersionCompatible(gateway's minimum, the orchestrator's runner version)."""
    if not min_version:
        return True
    if not runner_version or runner_version == "undefined":
        return False
    try:
        minimum = semver(min_version)
    except ValueError:
        return True
    try:
        return semver(runner_version) >= minimum
    except ValueError:
        return False


def _order(text: str) -> tuple[tuple[int, int, int], bool]:
    """Masterminds' order, near enough here: numbers first, a pre-release below its release."""
    match = SEMVER.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid semantic version {text!r}")
    return semver(text), match.group(4) is None


# -- external runners (aiModels entries with a url) and the versions they advertise ------------

@dataclass(frozen=True)
class Version:
    """worker.Version: what GET /version decoded to; all empty where it did not decode."""

    pipeline: str = ""
    model_id: str = ""
    version: str = ""


def client_url(server: str, route: str) -> str:
    """NewClient appends a slash to the server URL; each request resolves "./<route>" against
    it, so `http://host:8000/pipelines/x` reaches `http://host:8000/pipelines/x/version`."""
    return urljoin(server if server.endswith("/") else f"{server}/", f".{route}")


def external_version(entry: dict, get) -> Version:
    """NewRunnerContainer for one entry: the first health check must pass (else Warm fails and
    the starter stops: ConfigError here), then /version: a transport error keeps the entry's
    names with 0.0.0; an answer is decoded only on a 200 (nil otherwise, which
    Worker.Version() lists as an empty Version)."""
    try:
        health = Health.of(get(client_url(entry["url"], "/health")))
    except httpx.TransportError as exc:
        raise ConfigError(f"{entry['url']}: timed out waiting for runner: {exc!r}") from exc
    if health.code != 200 or health.status in ("", "ERROR"):
        raise ConfigError(f"{entry['url']}: health check failed with status code {health.code}"
                          f" ({health.status or 'no status'})")
    try:
        answer = get(client_url(entry["url"], "/version"))
    except httpx.TransportError:
        return Version(entry["pipeline"], entry["model_id"], "0.0.0")
    if answer.status_code != 200 or "json" not in answer.headers.get("content-type", ""):
        return Version()
    body = answer.json()
    return Version(body.get("pipeline", ""), body.get("model_id", ""), body.get("version", ""))


def lowest_version(versions: list[Version], pipeline: str, model_id: str) -> str:
    """LowestVersion: among the versions whose pipeline and model_id equal these exactly, the
    lowest that parses as semver; "" where none does."""
    result, lowest = "", None
    for v in versions:
        if v.pipeline != pipeline or v.model_id != model_id:
            continue
        try:
            order = _order(v.version)
        except ValueError:
            continue
        if lowest is None or order < lowest:
            result, lowest = v.version, order
    return result


def advertised_versions(entries: list[dict], get) -> dict[tuple[str, str], str]:
    """The starter's loop: each entry with a url is warmed (its version fetched), then the
    entry's (pipeline, model_id) advertises the lowest of the versions fetched so far that
    name it. `get(url)` answers like httpx.get."""
    versions: list[Version] = []
    advertised: dict[tuple[str, str], str] = {}
    for entry in entries:
        if entry.get("url"):
            versions.append(external_version(entry, get))
        key = (entry["pipeline"], entry["model_id"])
        advertised[key] = lowest_version(versions, *key)
    return advertised
