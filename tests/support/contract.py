"""Validate a response body against a component schema of the reference contract
(../shared/contract/openapi.yaml beside the repo); skips when the contract is absent."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRACT_FILE = REPO_ROOT / ".." / "shared" / "contract" / "openapi.yaml"


@cache
def contract() -> dict | None:
    if not CONTRACT_FILE.is_file():
        return None
    return yaml.safe_load(CONTRACT_FILE.read_text(encoding="utf-8"))


def contract_validator(name: str) -> Draft202012Validator:
    """A validator for one contract component, with every $ref resolved in the contract."""
    doc = contract()
    if doc is None:
        pytest.skip(f"reference contract not found at {CONTRACT_FILE.resolve()}")
    registry = Registry().with_resource(
        "urn:contract", Resource.from_contents(doc, default_specification=DRAFT202012))
    return Draft202012Validator({"$ref": f"urn:contract#/components/schemas/{name}"},
                                registry=registry)


def assert_valid(body, name: str) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}"
              for e in contract_validator(name).iter_errors(body)]
    assert not errors, f"response does not match contract {name}: {errors}"
