"""What the soak (scripts/loadtest.py --soak) sends: for every pipeline its own sample request
(scripts/bench_inputs.py, tiny sizes), bad inputs, and clients that vanish mid-request.

An item is one request and what the client does with it: read the answer (a sample must get a
result or busy, a bad input a 4xx) or leave before the answer (cut the upload short, close
while the run is in flight, drop a stream after its first chunk, or connect and say nothing).
`deck` deals the items of every selected pipeline in a fresh order each round, so each round is
a full pass over every pipeline and every kind of request.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import httpx
from bench_inputs import Call, Options, defaults, noise_png, request, spec_of, speech_wav


class Kind(StrEnum):
    SAMPLE = "sample"  # the pipeline's own request (or a variant of it): a result or busy
    BAD = "bad"  # something a client may send by mistake: a 4xx that says what is wrong
    VANISH = "vanish"  # the client leaves before its answer: nothing to read


class Leave(StrEnum):
    """How a vanishing client leaves."""

    CUT_UPLOAD = "cut-upload"  # the head and half the body, then close
    BEFORE_ANSWER = "before-answer"  # the whole request, then close before the answer
    MID_STREAM = "mid-stream"  # a streamed answer's first chunk read, then close
    SILENT = "silent"  # connect, then close without a byte


@dataclass(frozen=True)
class Body:
    """An HTTP request body: JSON, raw bytes, or multipart fields and files."""

    path: str
    json: Any = None
    content: bytes | None = None
    data: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes, str]] = field(default_factory=dict)

    def request(self, base_url: str, headers: dict[str, str]) -> httpx.Request:
        url = f"{base_url}{self.path}"
        if self.content is not None:
            return httpx.Request("POST", url, content=self.content,
                                 headers={**headers, "content-type": "application/json"})
        if self.json is not None:
            return httpx.Request("POST", url, json=self.json, headers=headers)
        return httpx.Request("POST", url, data=self.data, files=self.files, headers=headers)

    def raw(self, base_url: str, headers: dict[str, str]) -> tuple[bytes, bytes]:
        """The request's head and body as a client writes them on the socket."""
        built = self.request(base_url, headers)
        body = built.read()
        lines = [f"POST {self.path} HTTP/1.1"] + [f"{k}: {v}" for k, v in built.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode(), body


@dataclass(frozen=True)
class Item:
    pipeline: str  # which pipeline's runner serves it
    kind: Kind
    name: str  # what it is: "sample", "malformed-json", "cut-upload", ...
    body: Body
    leave: Leave | None = None
    stream: bool = False  # the answer is server-sent events

    @property
    def route(self) -> str:
        return self.body.path

    @property
    def label(self) -> str:
        return f"{self.route} {self.kind.value}:{self.name}"


UNKNOWN_MODEL = "nobody/no-such-model"
NOT_MEDIA = b"this is a text file, not the media the route expects\n" * 20
# A field out of its range, per route (the route's own schema or options refuse it).
OUT_OF_RANGE: dict[str, dict[str, Any]] = {
    "text-to-image": {"width": 60},
    "image-to-image": {"strength": "5"},
    "image-to-video": {"fps": "0"},
    "upscale": {"seed": "-1"},
    "audio-to-text": {"metadata": "{not json"},
    "image-to-text": {"prompt": "a picture of " * 100},
    "segment-anything-2": {"point_coords": "[[32, 32]"},
    "llm": {"temperature": 50},
    "text-to-speech": {"text": "A sentence that goes on. " * 240},
}
@functools.cache
def large_uploads() -> dict[str, tuple[str, tuple[str, bytes, str]]]:
    """pipeline -> (field, file): uploads far above the tiny sizes but within MAX_UPLOAD_BYTES,
    on the routes that scale them to their model's size before it runs (the diffusion routes
    would run at the upload's size): a 1536x1536 noise PNG (about 7 MiB), 30 s of speech."""
    image = ("large.png", noise_png(1536, 1536, seed=7), "image/png")
    return {"image-to-text": ("image", image), "segment-anything-2": ("image", image),
            "audio-to-text": ("audio", ("long.wav", speech_wav(30.0), "audio/wav"))}


@functools.cache
def sample_body(pipeline: str) -> Body:
    call: Call = request(pipeline, defaults(Options(), pipeline, tiny=True))
    if call.json is not None:
        return Body(call.path, json=call.json)
    return Body(call.path, data=call.data, files=call.files)


def is_streaming(pipeline: str) -> bool:
    """A pipeline whose JSON request takes `stream: true` (the chat routes)."""
    body = sample_body(pipeline)
    return body.json is not None and "messages" in body.json


def samples(pipeline: str) -> list[Item]:
    body = sample_body(pipeline)
    items = [Item(pipeline, Kind.SAMPLE, "sample", body)]
    if pipeline in large_uploads():
        name, upload = large_uploads()[pipeline]
        items.append(Item(pipeline, Kind.SAMPLE, "large-upload",
                          replace(body, files={**body.files, name: upload})))
    if is_streaming(pipeline):
        items.append(Item(pipeline, Kind.SAMPLE, "stream",
                          replace(body, json={**body.json, "stream": True}), stream=True))
        chat = Body("/v1/chat/completions", json={**body.json, "model": ""})
        items += [Item(pipeline, Kind.SAMPLE, "sample", chat),
                  Item(pipeline, Kind.SAMPLE, "stream",
                       replace(chat, json={**chat.json, "stream": True}), stream=True),
                  Item(pipeline, Kind.BAD, "out-of-range", replace(chat, json={**chat.json,
                                                                               "n": 2}))]
    return items


def bad_inputs(pipeline: str) -> list[Item]:
    body = sample_body(pipeline)
    model_field = "model" if body.json is not None and "messages" in body.json else "model_id"
    out_of_range = OUT_OF_RANGE.get(pipeline, {})
    if body.json is not None:
        variants = {"malformed-json": replace(body, json=None,
                                              content=b'{"prompt": "a cat", "seed": '),
                    "unknown-model": replace(body, json={**body.json,
                                                         model_field: UNKNOWN_MODEL})}
        if out_of_range:
            variants["out-of-range"] = replace(body, json={**body.json, **out_of_range})
    else:
        upload = next(iter(body.files))
        filename, content, media_type = body.files[upload]
        variants = {
            "not-media": replace(body, files={upload: (filename, NOT_MEDIA, media_type)}),
            "empty-file": replace(body, files={upload: (filename, b"", media_type)}),
            "truncated": replace(body, files={upload: (filename, content[:len(content) // 2],
                                                       media_type)}),
            "unknown-model": replace(body, data={**body.data, model_field: UNKNOWN_MODEL})}
        if out_of_range:
            variants["out-of-range"] = replace(body, data={**body.data, **out_of_range})
    return [Item(pipeline, Kind.BAD, name, variant) for name, variant in variants.items()]


def vanishing(pipeline: str) -> list[Item]:
    body = sample_body(pipeline)
    items = [Item(pipeline, Kind.VANISH, leave.value, body, leave)
             for leave in (Leave.CUT_UPLOAD, Leave.BEFORE_ANSWER)]
    if is_streaming(pipeline):
        items.append(Item(pipeline, Kind.VANISH, Leave.MID_STREAM.value,
                          replace(body, json={**body.json, "stream": True}), Leave.MID_STREAM,
                          stream=True))
    return items


def items(pipelines: list[str]) -> list[Item]:
    """One round: every pipeline's samples, bad inputs and vanishing clients, and a silent
    connection to its runner."""
    for pipeline in pipelines:
        spec_of(pipeline)  # an unknown name stops here, with the known ones
    return [item for p in pipelines for item in samples(p) + bad_inputs(p) + vanishing(p)
            + [Item(p, Kind.VANISH, Leave.SILENT.value, Body("/health"), Leave.SILENT)]]


def deck(pipelines: list[str], seed: int = 0) -> Iterator[tuple[int, Item]]:
    """Round after round of `items`, each round shuffled anew: (round number, item)."""
    rng = random.Random(seed)
    round_ = items(pipelines)
    for number in itertools.count():
        for item in rng.sample(round_, len(round_)):
            yield number, item
