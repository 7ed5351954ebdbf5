"""The OpenAPI document: every operation documents its problem answers.

FastAPI documents its own 422 as `HTTPValidationError`; here every 4xx/5xx answer is the
RFC 9457 `Problem` schema under ``application/problem+json``, and each /api/v1 operation
also lists the answers any request can get: 400, 401, 403, 413 (bodies), 422, 429, 500, 503.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from esplanade.api.problems import PROBLEM_MEDIA_TYPE, TITLES, FieldError, Problem

COMMON = (400, 401, 403, 422, 429, 500, 502, 503, 504)
WITH_BODY = (413, 415)


def _problem_entry(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def build_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes, openapi_version="3.1.0"
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas["Problem"].pop("$defs", None)
    schemas["FieldError"] = FieldError.model_json_schema()
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                # An optional parameter is one that may be left out, not one that may be "null".
                options = parameter.get("schema", {}).get("anyOf")
                if options and len(options) == 2 and {"type": "null"} in options:
                    kept = next(o for o in options if o != {"type": "null"})
                    parameter["schema"] = {**{k: v for k, v in parameter["schema"].items() if k != "anyOf"}, **kept}
                    parameter["schema"].pop("default", None)
            responses = operation.setdefault("responses", {})
            for status, entry in list(responses.items()):
                if status.isdigit() and int(status) >= 400:
                    responses[status] = {
                        **_problem_entry(entry.get("description", "")),
                        **{k: v for k, v in entry.items() if k not in ("content", "description")},
                    }
            if not path.startswith("/api/"):
                continue
            wanted = COMMON + (WITH_BODY if "requestBody" in operation else ())
            for status in wanted:
                responses.setdefault(str(status), _problem_entry(TITLES[status]))
            if any(p.get("in") == "path" for p in operation.get("parameters", [])):
                responses.setdefault("404", _problem_entry(TITLES[404]))
    app.openapi_schema = document
    return document
