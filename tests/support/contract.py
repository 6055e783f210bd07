"""The reference contract (tests/fixtures/contract/openapi.yaml, ai-runner 0.14.1) and a
validator of response bodies against its component schemas."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

CONTRACT_FILE = Path(__file__).resolve().parents[1] / "fixtures" / "contract" / "openapi.yaml"


@cache
def contract() -> dict:
    return yaml.safe_load(CONTRACT_FILE.read_text(encoding="utf-8"))


def contract_validator(name: str) -> Draft202012Validator:
    """A validator for one contract component, with every $ref resolved in the contract."""
    doc = contract()
    registry = Registry().with_resource(
        "urn:contract", Resource.from_contents(doc, default_specification=DRAFT202012))
    return Draft202012Validator({"$ref": f"urn:contract#/components/schemas/{name}"},
                                registry=registry)


def assert_valid(body, name: str) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}"
              for e in contract_validator(name).iter_errors(body)]
    assert not errors, f"response does not match contract {name}: {errors}"
