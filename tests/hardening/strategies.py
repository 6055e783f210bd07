"""Hypothesis strategies for request bodies, built from an OpenAPI document (the project's
`openapi.yaml`, or the app's own `app.openapi()` for the echo test pipeline).

Each generated request is one of:
- `valid`: every field valid by the schema (required ones present);
- `mutate`: a valid body with a few fields made wrong (wrong type, out of range, overlong,
  odd characters), a required field dropped, or unknown fields added;
- `chaos`: any subset of the fields, each valid or not, plus unknown fields;
- `garbage`: a body that is not what the route reads at all (bytes, another JSON shape,
  JSON sent to a multipart route, a form sent to a JSON route).

Inference is slow on two CPU cores even with tiny models, so a few fields ("cost" fields:
sizes, step and token counts) are always sent, either cheap-valid or invalid: an absent one
would take the model's default (1024x1024 images, 25 video frames at 1024x576), which is a
valid request, but seconds of CPU per example. Fields whose valid values mean an intended
failure (the echo pipeline's `fail`) or a different model (`model_id`) are kept to the cases
this suite means to exercise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from tests.hardening import support

# -- odd values ------------------------------------------------------------------------------

HOSTILE_STRINGS = [
    "", " ", "\x00", "a\x00b", "\r\nX-Injected: 1", "../../../../etc/passwd", "/etc/passwd",
    "..\\..\\windows\\win.ini", "C:\\Windows\\System32", "file:///etc/passwd",
    "http://169.254.169.254/latest/meta-data/", "%2e%2e%2f%2e%2e%2f", "${jndi:ldap://x/a}",
    "{{7*7}}", "'; DROP TABLE models; --", "\u202egnp.exe", "\ufeff", "\uffff", "🙂" * 40,
    "|" * 64, "a|b|c|d|e", "null", "true", "NaN", "-Infinity", "1e309", "0x10", "[]", "{}",
    "[[[[[[[[", "A" * 4096,
]
HOSTILE_IDS = [
    "../models", "../../etc/passwd", "/etc/passwd", "/models/x", "org/../../x", "org/..",
    "..", ".", "./x", "org\\name", "org/name\\..\\x", "https://huggingface.co/org/name",
    "http://127.0.0.1:11434/api/pull", "file:///etc/passwd", "org/name\x00", "\x00", "~/x",
    "org/name/extra", "org//name", " org/name", "org/name ", "org/name\n", "models--org--name",
    "%2e%2e/x", "C:\\models\\x", "a" * 300,
]


def odd_text(json_route: bool, max_size: int = 64) -> st.SearchStrategy[str]:
    """Any characters: controls, format characters, astral planes; lone surrogates only where
    JSON can carry them (a multipart value is UTF-8 bytes)."""
    excluded = () if json_route else ("Cs",)
    text = st.text(st.characters(exclude_categories=excluded), max_size=max_size)
    if json_route:  # drawn too rarely by chance: a lone surrogate on its own or in text
        text = text | st.sampled_from(["\ud800", "a\udfffb", "\udc80" * 3])
    return text


def any_json(json_route: bool) -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers() | st.floats()
               | odd_text(json_route, 16))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(odd_text(json_route, 8), inner, max_size=3),
                        max_leaves=8)


HUGE_NUMBERS = [10**30, -10**30, 2**63, 2**64, -2**63 - 1, 1e308, -1e308, 10**400]

# -- per-route knowledge -----------------------------------------------------------------------

CHEAP = {  # cost fields: always sent, cheap when valid
    "width": [64], "height": [64], "num_inference_steps": [1, 2],
    "num_images_per_prompt": [1, 2], "max_tokens": [1, 2, 3], "max_completion_tokens": [1, 2],
    "sleep": [0],
}
COST_INVALID = {  # what is surely invalid for a cost field (never a valid, expensive value)
    "width": [0, 63, 65, -64, 1 << 20, 10**30, 1.5, "64px", "", "NaN"],
    "height": [0, 63, 65, -64, 1 << 20, 10**30, 1.5, "64px", "", "NaN"],
    "num_inference_steps": [0, -1, 151, 10**30, 1.5, "two", ""],
    "num_images_per_prompt": [0, -1, 9, 10**6, 10**30, 1.5, "x"],
    "max_tokens": [0, -1, -(10**30), 1.5, "many", True],
    "max_completion_tokens": [-1, -(10**30), 1.5, "many"],
    "sleep": [-1, 31, 10**30, "forever", "NaN"],
}


@dataclass
class Route:
    path: str
    multipart: bool
    properties: dict[str, dict]
    required: set[str]
    models: list[str]  # ids this suite may name: the default (and cheap ones)
    files: dict[str, str] = field(default_factory=dict)  # file field -> "image" | "audio"
    overrides: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = field(
        default_factory=dict)  # field -> (valid, invalid)

    @property
    def json_route(self) -> bool:
        return not self.multipart


def resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def route_from_spec(spec: dict, path: str, models: list[str]) -> Route:
    body = spec["paths"][path]["post"]["requestBody"]
    ((content_type, content),) = body["content"].items()
    schema = resolve(spec, content["schema"])
    properties = schema.get("properties", {})
    files = {name: ("audio" if "audio" in name else "image") for name, prop in properties.items()
             if prop.get("format") == "binary"}
    route = Route(path, content_type.startswith("multipart/"), properties,
                  set(schema.get("required", [])), models, files)
    route.overrides = domain_overrides(route)
    return route


# -- values from a schema ----------------------------------------------------------------------

def valid_value(spec: dict, schema: dict, name: str, json_route: bool) -> st.SearchStrategy:
    schema = resolve(spec, schema)
    if "anyOf" in schema:
        return st.one_of([valid_value(spec, s, name, json_route) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        low = None if low is None else math.ceil(low)
        high = None if high is None else min(int(high), 2**63 - 1)
        values = st.integers(low, high)
        step = schema.get("multipleOf")
        return values.map(lambda v: v - v % int(step)).filter(
            lambda v: low is None or v >= low) if step else values
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False,
                         allow_infinity=False)
    if kind == "string":
        size = min(schema.get("maxLength", 200), 200)
        return st.text(st.characters(exclude_categories=() if json_route else ("Cs",)),
                       min_size=schema.get("minLength", 0), max_size=size)
    if kind == "array":
        item = valid_value(spec, schema.get("items", {}), name, json_route)
        return st.lists(item, min_size=schema.get("minItems", 0),
                        max_size=max(schema.get("minItems", 0), 3))
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: valid_value(spec, props[k], k, json_route) for k in props if k in required},
            optional={k: valid_value(spec, props[k], k, json_route)
                      for k in props if k not in required})
    return any_json(json_route)


def invalid_value(spec: dict, schema: dict, json_route: bool) -> st.SearchStrategy:
    """Values the schema rejects, mostly; a few land inside it, which is fine."""
    schema = resolve(spec, schema)
    branches = schema.get("anyOf", [schema])
    wrong: list[st.SearchStrategy] = [
        st.sampled_from(HOSTILE_STRINGS), odd_text(json_route), st.sampled_from(HUGE_NUMBERS),
        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(),
                                                             max_size=2),
        st.just(float("nan")), st.just(float("inf")), st.booleans(),
    ]
    for branch in (resolve(spec, b) for b in branches):
        low, high = branch.get("minimum"), branch.get("maximum")
        if low is not None:
            wrong.append(st.sampled_from([low - 1, low - 0.5, -(10**12)]))
        if high is not None:
            wrong.append(st.sampled_from([high + 1, high * 10 + 1, 10**12]))
        if "maxLength" in branch:
            wrong.append(st.just("x" * (branch["maxLength"] + 1)))
        if branch.get("type") == "integer":
            wrong.append(st.sampled_from([1.5, "1e3", " 7 ", "seven"]))
    return st.one_of(wrong)


# -- domain overrides ------------------------------------------------------------------------

def json_string(value: Any) -> str:
    return json.dumps(value)


def domain_overrides(route: Route) -> dict[str, tuple[st.SearchStrategy, st.SearchStrategy]]:
    json_route = route.json_route
    text = odd_text(json_route)
    out: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = {}
    for name in route.properties:
        if name in CHEAP:
            out[name] = (st.sampled_from(CHEAP[name]), st.sampled_from(COST_INVALID[name]))
    for name in ("model_id", "model"):
        if name in route.properties:
            out[name] = (st.sampled_from(["", *route.models]),
                         st.sampled_from(HOSTILE_IDS) | text)
    if "loras" in route.properties:
        out["loras"] = (
            st.sampled_from(["", "{}", "  "]),
            st.sampled_from([
                "[" * 5000, "{" * 5000, "1" * 5000, '{"a/b": ' + "9" * 400 + "}",
                '{"a/b": -1}', '{"a/b": NaN}', '{"a/b": Infinity}', '{"a/b": "1"}',
                '{"a/b": true}', '{"../x": 1}', '{"/etc/passwd": 1}', '{"a\\\\b": 1}',
                '{"http://x/y": 1}', '{"a/b\\u0000": 1}',
                '{"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}',
                '{"missing/lora": 1.0}', "[]", "null", "not json",
            ]) | text | any_json(json_route).map(json_string))
    if "metadata" in route.properties:
        out["metadata"] = (any_json(json_route).map(json_string),
                           st.sampled_from(["[" * 5000, "1" * 5000, "{", "nope", "\x00"]) | text)
    if "return_timestamps" in route.properties:
        out["return_timestamps"] = (
            st.sampled_from(["true", "false", "1", "0", "word", "sentence", " TRUE "]),
            text | st.sampled_from(["yes", "2", "words", ""]))
    if "fail" in route.properties:  # echo: true means "raise on purpose", an intended 500
        out["fail"] = (st.sampled_from([False, "false", "0", "off"]),
                       st.sampled_from(["maybe", "2", "truthy", "", "[]"]))
    if "points" in route.properties:  # echo: its run() answers a list and catches only
        # JSONDecodeError, so other JSON values and too-deep nesting are its own (test-only)
        # 500s, kept out of the fuzz (see the report of this suite)
        out["points"] = (st.lists(any_json(json_route), max_size=3).map(json_string),
                         st.sampled_from(["[[1,2", "{", "nope", "[1,]", "\x00"]))
    if route.path == "/segment-anything-2":
        # One point (labels must match the count), inside the smallest valid image (8x8).
        point = st.tuples(st.integers(0, 8), st.integers(0, 8) | st.floats(0, 8))
        out["point_coords"] = (point.map(lambda p: json_string([list(p)])), sam2_garbage(text))
        out["point_labels"] = (st.sampled_from(["[1]", "[0]"]), sam2_garbage(text))
        out["box"] = (st.sampled_from(["[0,0,8,8]", "[[1,2,7,6]]", ""]), sam2_garbage(text))
        out["mask_input"] = (st.just(""), sam2_garbage(text))
    if route.path.startswith("/v1/"):  # OpenAI's schema takes any role; the runner three
        part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                      "text": text})
        message = st.fixed_dictionaries({
            "role": st.sampled_from(["system", "user", "assistant"]),
            "content": text | st.lists(part, max_size=2) | st.none()})
        out["messages"] = (st.lists(message, min_size=1, max_size=3),
                           st.lists(any_json(json_route), max_size=2) | text
                           | st.just([]) | st.lists(st.fixed_dictionaries(
                               {"role": st.sampled_from(["tool", "", "USER", "x" * 99])}),
                               min_size=1, max_size=2))
    if route.path == "/llm" or route.path.startswith("/v1/"):
        # Sampling settings are cheap; their bounds are the schema's.
        out.setdefault("stop", (st.none() | st.text(min_size=1, max_size=4)
                                | st.lists(st.text(min_size=1, max_size=4), max_size=3),
                                st.sampled_from([[""], [""] * 3, ["x"] * 17, "", 5])))
    return out


def sam2_garbage(text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.sampled_from([
        "[" * 5000, "[[1,2", "[[1,2,3]]", "[[1],[2]]", "[1,2]", "[[NaN,1]]", "[[1e400,1]]",
        "[[-1,5]]", "[[100000,5]]", '[["a","b"]]', "[[true,false]]", "[[1,2],[3]]", "[]", "[[]]",
        "{}", "null", "1", '"[[1,2]]"', "[[" + "1," * 10000 + "1]]", "[2]", "[1,1,1]",
        "[10,10,0,0]", "[0,0,1e9,1e9]", "[[0.5,0.5]]" * 3,
    ]) | text


# -- file parts ----------------------------------------------------------------------------------

def image_part() -> st.SearchStrategy[bytes]:
    from PIL import Image

    def small(args) -> bytes:
        width, height, mode, fmt, seed = args
        if fmt == "JPEG" and mode not in ("RGB", "L", "CMYK"):
            mode = "RGB"
        size = len(Image.new(mode, (width, height)).tobytes())
        image = Image.frombytes(mode, (width, height), bytes((seed + i * 7) % 256
                                                              for i in range(size)))
        try:
            return support.image_bytes(image, fmt)
        except (OSError, ValueError, KeyError):  # a mode this format cannot store
            return support.image_bytes(image.convert("RGB"), fmt)

    # At least 24 px: the tiny diffusion models' GroupNorms (32 channels, 32 groups) fail on
    # 1x1 features without CFG batching (guidance_scale or image_guidance_scale below 1); the real
    # models have 10+ channels per group. 1-pixel inputs have their own tests.
    valid = st.tuples(st.integers(24, 48), st.integers(24, 48),
                      st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "CMYK"]),
                      st.sampled_from(["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]),
                      st.integers(0, 255)).map(small)
    good = support.noise_png(16, 16)
    broken = st.sampled_from([
        b"", b"\x89PNG\r\n\x1a\n", good[: len(good) // 2], good[:40], b"GIF89a" + b"\0" * 16,
        support.raw_png(0, 10), support.raw_png(100_000, 100_000, idat=b"x"),
        support.raw_png(4000, 4000, idat=b"\x78\x9c"),
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n",
        b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    ])
    return valid | broken | st.binary(max_size=512)


def audio_part() -> st.SearchStrategy[bytes]:
    good = support.wav(support.tone(0.3))
    return st.one_of(
        st.floats(0.05, 1.0).map(lambda s: support.wav(support.tone(s))),
        st.sampled_from([b"", good[:44], good[:30], good[: len(good) // 2],
                         support.wav(support.tone(0.2), claimed_bytes=0xFFFFFFF0),
                         support.noise_png(8, 8), b"ID3\x04\x00\x00\x00\x00\x00\x00",
                         b"OggS" + b"\0" * 40, b"fLaC" + b"\0" * 40]),
        st.binary(max_size=512),
    )


# -- whole requests -------------------------------------------------------------------------------

@dataclass
class Request:
    """What to send: `kwargs` for httpx (TestClient) `post`."""

    path: str
    kwargs: dict
    mode: str
    fields: dict

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        short = {k: (v[:80] + "...") if isinstance(v, str) and len(v) > 80 else v
                 for k, v in self.fields.items()}
        return f"Request({self.mode} {self.path} {short!r})"


def form_value(value: Any) -> str:
    """A form value as go-livepeer writes it: floats with 6 decimals, booleans lowercase, JSON
    for arrays and objects."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


@st.composite
def requests(draw, spec: dict, route: Route) -> Request:
    json_route = route.json_route
    mode = draw(st.sampled_from(["valid", "valid", "mutate", "mutate", "chaos", "garbage"]))
    path = route.path + draw(st.sampled_from(["", "", "", "/"]))
    names = [n for n in route.properties if n not in route.files]

    def valid(name):
        if name in route.overrides:
            return route.overrides[name][0]
        return valid_value(spec, route.properties[name], name, json_route)

    def invalid(name):
        if name in route.overrides:
            return route.overrides[name][1]
        return invalid_value(spec, route.properties[name], json_route)

    fields: dict[str, Any] = {}
    if mode in ("valid", "mutate"):
        for name in names:
            if name in route.required or name in CHEAP or draw(st.booleans()):
                fields[name] = draw(valid(name))
        if mode == "mutate":
            for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3,
                                      unique=True)) if names else []:
                fields[name] = draw(invalid(name))
            if route.required - set(route.files) and draw(st.booleans()):
                fields.pop(draw(st.sampled_from(sorted(route.required - set(route.files)))),
                           None)
    else:
        for name in names:
            if name in CHEAP or draw(st.booleans()):
                fields[name] = draw(valid(name) | invalid(name))
    if mode != "valid" and draw(st.booleans()):
        extra = draw(st.dictionaries(odd_text(json_route, 12).filter(
            lambda k: k not in route.properties), any_json(json_route), max_size=3))
        fields.update(extra)

    files: dict[str, tuple[str, bytes, str]] = {}
    for name, kind in route.files.items():
        if mode == "valid" or draw(st.integers(0, 5)) > 0:
            content = draw(image_part() if kind == "image" else audio_part()) \
                if mode != "valid" else draw(valid_file(kind))
            filename = draw(st.sampled_from([f"in.{'png' if kind == 'image' else 'wav'}",
                                             "../../etc/passwd", "a\\b.png", "", "x.mp3",
                                             "\u202e.png"]))
            ctype = draw(st.sampled_from(["image/png", "audio/wav", "application/octet-stream",
                                          "text/plain", ""]))
            files[name] = (filename or "blob", content, ctype or "application/octet-stream")

    if mode == "garbage":
        return Request(path, draw(garbage(route, fields, files)), mode, fields)
    if json_route:
        body = json.dumps(fields, ensure_ascii=True, allow_nan=True)  # NaN, lone surrogates
        ctype = draw(st.sampled_from(["application/json", "application/json",
                                      "application/json; charset=utf-8", None,
                                      "application/x-www-form-urlencoded"]))
        headers = {"content-type": ctype} if ctype else {}
        return Request(path, {"content": body.encode(), "headers": headers}, mode, fields)
    data = {k: form_value(v) for k, v in fields.items() if v is not None}
    return Request(path, {"data": data, "files": files}, mode, fields)


@st.composite
def valid_file(draw, kind: str) -> bytes:
    if kind == "audio":
        return support.wav(support.tone(draw(st.floats(0.1, 1.0))))
    return support.noise_png(draw(st.integers(24, 48)), draw(st.integers(24, 48)),
                             draw(st.integers(0, 9)))


def utf8(text: str) -> bool:
    """Whether a multipart body can carry `text` (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def garbage(draw, route: Route, fields: dict, files: dict) -> dict:
    kind = draw(st.sampled_from(["bytes", "json-shape", "crossed", "truncated"]))
    if kind == "bytes":
        ctype = draw(st.sampled_from(["application/json", "multipart/form-data",
                                      "multipart/form-data; boundary=x", "text/plain",
                                      "application/octet-stream", "", "image/png"]))
        return {"content": draw(st.binary(max_size=2048)),
                "headers": {"content-type": ctype} if ctype else {}}
    if kind == "json-shape":
        body = draw(any_json(True) | st.lists(st.just(fields), max_size=2))
        return {"content": json.dumps(body, allow_nan=True).encode(),
                "headers": {"content-type": "application/json"}}
    if kind == "crossed" and route.json_route:  # a form where JSON is expected
        form = {k: form_value(v) for k, v in fields.items() if v is not None}
        return {"data": {k: v for k, v in form.items() if utf8(k) and utf8(v)},
                "files": {"file": ("a.png", support.noise_png(8, 8), "image/png")}}
    if kind == "crossed":  # JSON where a form is expected
        return {"content": json.dumps(fields, allow_nan=True).encode(),
                "headers": {"content-type": "application/json"}}
    body = json.dumps(fields, allow_nan=True).encode()
    cut = draw(st.integers(0, max(0, len(body) - 1)))
    return {"content": body[:cut], "headers": {"content-type": "application/json"}}
