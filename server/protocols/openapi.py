"""The OpenAPI 3.0 document of the v2 REST endpoints this server serves (GET /v2/openapi.json).

Written from the Open Inference Protocol's REST specification, Triton's binary tensor data and
model configuration extensions, and gradserve's request parameters. The parameter names, the
derivative kinds, the datatypes and the latency breakdown come from the code that reads and
writes them, so the document cannot drift from what the server accepts.
"""

from __future__ import annotations

from gradserve.server.core.contract import ModelSpec
from gradserve.server.core.statistics import BATCH_STATISTICS, REQUEST_STATISTICS
from gradserve.wire import tensors
from gradserve.wire.kinds import OPTIONS, TARGET, Derivative
from gradserve.wire.timing import FIELDS

HEALTH_LIVE = "/v2/health/live"
HEALTH_READY = "/v2/health/ready"
SERVER = "/v2"
OPENAPI = "/v2/openapi.json"
MODEL = "/v2/models/{model}"
VERSIONED = MODEL + "/versions/{version}"
STATISTICS = "/v2/models/stats"  # every model's; MODEL or VERSIONED + "/stats": one's
REPOSITORY_INDEX = "/v2/repository/index"
REPOSITORY_MODEL = "/v2/repository/models/{model}"
CONTROL = ("load", "unload")  # REPOSITORY_MODEL + "/" + each
ERRORS = {  # the statuses an endpoint may answer with {"error": ...}, and when
    400: "bad input (or a load that failed, or model control that is not explicit): the "
    "message says what was wrong and what was expected",
    404: "no such model or version (or path)",
    405: "the path is served, but not with this method",
    408: "the request body did not arrive in time",
    413: "the request body is larger than --max-message-mb",
    429: "the queue is full; retry after Retry-After seconds",
    503: "the server is loading, draining or has lost its engine; retry elsewhere",
    504: "the request's deadline passed before it was computed",
}
_REFUSALS = (400, 404, 408, 413, 429, 503, 504)  # an inference request's
_TYPES = {bool: "boolean", int: "integer", float: "number"}
_DATATYPES = [kind.kserve for kind in tensors.FLOAT_TYPES]
_SIZE = {"type": "integer", "minimum": 0}
_SCHEMA = "#/components/schemas/"


def _ref(name: str) -> dict:
    return {"$ref": _SCHEMA + name}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _object(required: list[str], **properties: dict) -> dict:
    return {"type": "object", "required": required, "properties": properties}


def _answers(ok: dict, *errors: int, not_ready: str = "") -> dict:
    """An operation's responses: 200 as `ok` (a content map), each error as Error; a
    readiness endpoint (`not_ready`: its answer's schema) answers 503 with it or an Error."""
    answers = {"200": {"description": "OK", "content": ok}}
    for status in (*errors, 405):
        answers[str(status)] = {"description": ERRORS[status], "content": _json(_ref("Error"))}
    if not_ready:
        either = {"anyOf": [_ref(not_ready), _ref("Error")]}
        answers["503"] = {
            "description": "not ready (loading or draining)",
            "content": _json(either),
        }
    return answers


def _parameters() -> dict:
    """gradserve's request parameters, with the protocol's own (priority, binary output)."""
    kinds = [kind.value for kind in Derivative]
    properties = {
        "derivative": {
            "type": "string",
            "enum": kinds,
            "default": "gradient",
            "description": "what to compute besides y",
            "x-gradserve-kinds": _kind_table(),
        },
        "priority": {
            "type": "integer",
            "minimum": 0,
            "description": "1: high (computed first); 0, absent or 2 and up: normal",
        },
        "binary_data_output": {"type": "boolean", "description": "answer every output in binary"},
        "timeout": {
            "type": "integer",
            "minimum": 0,
            "description": "microseconds the request may wait for the engine before it is "
            "answered 504, never computed (0 or absent: no limit)",
        },
        TARGET.name: {
            "type": "integer",
            "minimum": 0,
            "description": "the output to differentiate (kinds that take a target)",
        },
    }
    for kind, options in OPTIONS.items():
        for option in options:
            if option.type is not None:
                properties[option.name] = {
                    "type": _TYPES[option.type],
                    "description": f"{kind.value}: default {option.default}",
                }
    loose = {"anyOf": [{"type": t} for t in ("string", "boolean", "number")]}
    return {"type": "object", "properties": properties, "additionalProperties": loose}


def _kind_table() -> list[dict]:
    """What each kind takes, for clients that build requests from the document (the
    explorer page): a vector v, a target, and its scalar options with their defaults."""
    return [
        {
            "name": kind.value,
            "vector": kind.needs_vector,
            "target": kind.takes_target,
            "options": [{"name": o.name, "type": _TYPES[o.type], "default": o.default}
                        for o in kind.options if o.type is not None],
        }
        for kind in Derivative
    ]  # fmt: skip


def _schemas() -> dict:
    sizes = {"type": "array", "items": _SIZE}
    tensor = _object(  # metadata: -1 for a size that varies (the rows)
        ["name", "datatype", "shape"],
        name={"type": "string"},
        datatype={"type": "string"},
        shape={"type": "array", "items": {"type": "integer", "minimum": -1}},
    )
    data = {
        "type": "array",
        "items": {"anyOf": [{"type": "number"}, {"type": "array"}]},
        "description": "the values, row-major: flat or nested as the shape",
    }
    request_input = _object(
        ["name", "datatype", "shape"],
        name={"type": "string"},
        datatype={"type": "string", "enum": _DATATYPES},
        shape=sizes,
        data=data,
        parameters=_object([], binary_data_size=_SIZE),
    )
    request_output = _object(
        ["name"], name={"type": "string"}, parameters=_object([], binary_data={"type": "boolean"})
    )
    response_output = _object(
        ["name", "datatype", "shape"],
        name={"type": "string"},
        datatype={"type": "string", "enum": _DATATYPES},
        shape=sizes,
        data={"type": "array", "items": {"type": "number"}},
        parameters=_object(["binary_data_size"], binary_data_size=_SIZE),
    )
    hops = {name: {"type": "integer"} for name in FIELDS}
    configured = _object(
        ["name", "data_type", "dims"],
        name={"type": "string"},
        data_type={"type": "string"},
        dims={"type": "array", "items": {"type": "integer"}},
    )
    strings = {"type": "array", "items": {"type": "string"}}
    duration = _object(["count", "ns"], count=_SIZE, ns=_SIZE)
    version_statistics = _object(
        ["name", "version", "last_inference", "inference_count", "execution_count",
         "inference_stats", "batch_stats"],
        name={"type": "string"},
        version={"type": "string"},
        last_inference={**_SIZE, "description": "epoch milliseconds of the last answer"},
        inference_count={**_SIZE, "description": "rows answered by successful requests"},
        execution_count={**_SIZE, "description": "engine calls (batches)"},
        inference_stats=_object(list(REQUEST_STATISTICS),
                                **dict.fromkeys(REQUEST_STATISTICS, duration)),
        batch_stats={"type": "array", "items": _object(
            ["batch_size", *BATCH_STATISTICS], batch_size=_SIZE,
            **dict.fromkeys(BATCH_STATISTICS, duration))},
    )  # fmt: skip
    return {
        "ModelStatistics": _object(
            ["model_stats"], model_stats={"type": "array", "items": version_statistics}
        ),
        "Error": _object(["error"], error={"type": "string"}),
        "Live": _object(["live"], live={"type": "boolean"}),
        "Ready": _object(["ready"], ready={"type": "boolean"}),
        "ModelReady": _object(
            ["name", "ready"], name={"type": "string"}, ready={"type": "boolean"}
        ),
        "ServerMetadata": _object(
            ["name", "version", "extensions"],
            name={"type": "string"},
            version={"type": "string"},
            extensions=strings,
        ),
        "ModelMetadata": _object(
            ["name", "platform", "inputs", "outputs"],
            name={"type": "string"},
            versions=strings,
            platform={"type": "string"},
            inputs={"type": "array", "items": tensor},
            outputs={"type": "array", "items": tensor},
        ),
        "ModelConfig": _object(
            ["name", "platform", "max_batch_size", "input", "output"],
            name={"type": "string"},
            platform={"type": "string"},
            backend={"type": "string"},
            max_batch_size={"type": "integer"},
            input={"type": "array", "items": configured},
            output={"type": "array", "items": configured},
        ),
        "RepositoryIndexRequest": _object([], ready={"type": "boolean"}),
        "RepositoryControl": {
            **_object([], parameters={"type": "object", "maxProperties": 0}),
            "description": "the model's files are taken as they are in the repository: no "
            "parameter (a config or files override) is taken",
        },
        "RepositoryIndex": {
            "type": "array",
            "items": _object(
                ["name", "version", "state"],
                name={"type": "string"},
                version={"type": "string"},
                state={"type": "string", "enum": ["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]},
                reason={"type": "string"},
            ),
        },
        "Parameters": _parameters(),
        "InferenceRequest": {
            **_object(
                ["inputs"],
                id={"type": "string"},
                parameters=_ref("Parameters"),
                inputs={"type": "array", "minItems": 1, "items": request_input},
                outputs={"type": "array", "items": request_output},
            ),
        },
        "InferenceResponse": _object(
            ["model_name", "outputs"],
            model_name={"type": "string"},
            model_version={"type": "string"},
            id={"type": "string"},
            outputs={"type": "array", "items": response_output},
            parameters={
                "type": "object",
                "properties": hops,
                "description": "where the request's time went, in microseconds",
            },
        ),
    }


def _model_parameters(specs: list[ModelSpec], versioned: bool) -> list[dict]:
    names = sorted(spec.name for spec in specs)
    served = {"type": "string", "enum": names} if names else {"type": "string"}
    model = {"name": "model", "in": "path", "required": True, "schema": served}
    if not versioned:
        return [model]
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    return [model, version]


def _infer(header: str) -> dict:
    binary = {"schema": {"type": "string", "format": "binary"}}
    length = {
        "name": header,
        "in": "header",
        "required": False,
        "description": "binary tensor extension: the JSON header's length in bytes; the "
        "binary inputs follow it (0: the whole body is the rows of x)",
        "schema": _SIZE,
    }
    return {
        "summary": "Compute the model's outputs and derivatives for the request's rows",
        "parameters": [length],
        "requestBody": {
            "required": True,
            "content": {**_json(_ref("InferenceRequest")), "application/octet-stream": binary},
        },
        "responses": _answers(
            {**_json(_ref("InferenceResponse")), "application/octet-stream": binary}, *_REFUSALS
        ),
    }


def document(specs: list[ModelSpec], version: str, header: str) -> dict:
    """The OpenAPI document of the served models (`specs`); `header` names the binary
    extension's JSON length header."""
    paths = {
        HEALTH_LIVE: {
            "get": {"summary": "Is the server live", "responses": _answers(_json(_ref("Live")))}
        },
        HEALTH_READY: {
            "get": {
                "summary": "Is the server ready to infer",
                "responses": _answers(_json(_ref("Ready")), not_ready="Ready"),
            }
        },
        SERVER: {
            "get": {
                "summary": "Server metadata",
                "responses": _answers(_json(_ref("ServerMetadata"))),
            }
        },
        OPENAPI: {
            "get": {"summary": "This document", "responses": _answers(_json({"type": "object"}))}
        },
    }
    paths[REPOSITORY_INDEX] = {
        "post": {
            "summary": "Every model version the repository knows, and its state",
            "requestBody": {"required": False, "content": _json(_ref("RepositoryIndexRequest"))},
            "responses": _answers(_json(_ref("RepositoryIndex")), 400),
        }
    }
    folder = {"type": "string", "minLength": 1, "pattern": "^[^/]+$"}  # a repository folder's
    named = {"name": "model", "in": "path", "required": True, "schema": folder}
    for operation in CONTROL:
        paths[f"{REPOSITORY_MODEL}/{operation}"] = {
            "parameters": [named],
            "post": {
                "summary": f"{operation.capitalize()} a model (--model-control explicit)",
                "requestBody": {"required": False, "content": _json(_ref("RepositoryControl"))},
                "responses": _answers(_json({"type": "object"}), 400, 404, 503),
            },
        }
    statistics = _json(_ref("ModelStatistics"))
    paths[STATISTICS] = {
        "get": {
            "summary": "Statistics of every served model version (the statistics extension)",
            "responses": _answers(statistics, 503),
        }
    }
    for base in (MODEL, VERSIONED):
        common = {"parameters": _model_parameters(specs, base == VERSIONED)}
        paths[base + "/stats"] = {
            **common,
            "get": {
                "summary": "Statistics of this model's served versions, or of one",
                "responses": _answers(statistics, 404, 503),
            },
        }
        model = _json(_ref("ModelMetadata"))
        ready = _json(_ref("ModelReady"))
        config = _json(_ref("ModelConfig"))
        paths[base] = {
            **common,
            "get": {"summary": "Model metadata", "responses": _answers(model, 404, 503)},
        }
        paths[base + "/ready"] = {
            **common,
            "get": {
                "summary": "Is the model ready",
                "responses": _answers(ready, 404, not_ready="ModelReady"),
            },
        }
        paths[base + "/config"] = {
            **common,
            "get": {
                "summary": "Model configuration (Triton's extension)",
                "responses": _answers(config, 404, 503),
            },
        }
        paths[base + "/infer"] = {**common, "post": _infer(header)}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "gradserve: the Open Inference Protocol over HTTP/JSON",
            "version": version,
            "description": "KServe v2 REST with Triton's binary tensor data extension; "
            "every model answers its output y and the derivative asked for.",
        },
        "paths": paths,
        "components": {"schemas": _schemas()},
    }
