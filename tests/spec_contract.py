"""The official OpenAPI document, for contract checks in the fake-server tests.

Read from ``../shared/spec/`` beside the repository; every helper is a no-op (or a clear skip)
when it is absent.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "spec" / "parallel-openapi.json"
SPEC_URI = "urn:parallel:openapi"


@functools.cache
def spec_registry() -> Registry[Any] | None:
    """The document as a ``referencing`` registry, or ``None`` when it is absent."""
    if not SPEC_PATH.is_file():
        return None
    document = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    resource: Resource[Any] = Resource.from_contents(document, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(SPEC_URI, resource)
    return registry


@functools.cache
def _validator(
    method: str, template: str, status: int, media: str
) -> jsonschema.Draft202012Validator:
    registry = spec_registry()
    assert registry is not None
    responses = registry.contents(SPEC_URI)["paths"][template][method.lower()]["responses"]
    if str(status) in responses:
        escaped = template.replace("~", "~0").replace("/", "~1")
        pointer = f"/paths/{escaped}/{method.lower()}/responses/{status}/content/"
        pointer += media.replace("/", "~1") + "/schema"
    else:
        # Statuses the spec does not list for this operation (e.g. an injected 503): the
        # API answers every non-2xx with ErrorResponse.
        assert status >= 400, f"{method} {template} -> {status} is not in the spec"
        pointer = "/components/schemas/ErrorResponse"
    return jsonschema.Draft202012Validator({"$ref": f"{SPEC_URI}#{pointer}"}, registry=registry)


def check_contract(
    method: str, template: str, status: int, body: object, media: str = "application/json"
) -> None:
    """Validate ``body`` (or one SSE event's data) against the spec's response schema."""
    if spec_registry() is not None:
        _validator(method, template, status, media).validate(body)
