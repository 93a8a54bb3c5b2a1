"""The documentation site's reference pages, generated at each `mkdocs build` from the code
itself (mkdocs-gen-files runs this file), so that they cannot drift from it:

- reference/flags.md: every `gradserve serve` flag from the config's own definitions, and
  `gradserve loadtest --help` as the parser prints it;
- reference/metrics.md: every metric family a server's registry holds, with its type, help
  and labels (tests/test_docs.py checks it against a real server's /metrics);
- reference/protocol.md: the native protocol's services, messages and enums, with the
  comments of the .proto file (read through protoc's source info);
- reference/rest.md: every REST endpoint and request parameter, from the OpenAPI document the
  server serves at /v2/openapi.json (server/protocols/openapi.py).
"""

from __future__ import annotations

import argparse
import html
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mkdocs_gen_files
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from gradserve.client import loadtest
from gradserve.server import config
from gradserve.server.metrics import Metrics
from gradserve.server.protocols import openapi
from gradserve.wire.http import HEADER_LENGTH

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
NATIVE_PROTO = "gradserve/v1/gradserve.proto"
GENERATED = "*Generated from the code at each build of this site; do not edit.*\n\n"


def cell(text: object) -> str:
    """Plain text safe inside a Markdown table cell: angle brackets are not HTML, and
    asterisks (as in [n, *X]) are not emphasis."""
    escaped = html.escape(str(text), quote=False)
    return escaped.replace("|", "\\|").replace("*", "\\*").replace("\n", " ")


# -- flags --------------------------------------------------------------------------------


def shown_default(flag: config.Flag) -> str:
    if flag.type == "bool":
        return "on" if flag.default else "off"
    return "(empty)" if flag.default == "" else str(flag.default)


def flags_page() -> str:
    lines = [
        "# Server flags\n\n",
        GENERATED,
        "`gradserve serve` takes these flags. Each can also be set by its environment "
        "variable; a flag given on the command line wins. Booleans take `on`/`off` "
        "(also `true`/`false`, `1`/`0`, `yes`/`no`).\n\n",
        "| flag and environment variable | default | what it does |\n",
        "|---|---|---|\n",
    ]
    for flag in config.flags():
        names = ", ".join(f"`{name}`" for name in (flag.flag, *flag.aliases))
        help_text = flag.help.replace("%%", "%")
        default = cell(shown_default(flag))
        lines.append(f"| {names}<br>`{flag.env}` | `{default}` | {cell(help_text)} |\n")
    parser = argparse.ArgumentParser(prog="gradserve loadtest", formatter_class=_WideHelp)
    loadtest.add_arguments(parser)
    lines += [
        "\n## `gradserve loadtest`\n\n",
        "The load tester's options, as `gradserve loadtest --help` prints them "
        "(see [Load testing](../user-guide/load-testing.md)):\n\n",
        "```text\n",
        parser.format_help(),
        "```\n",
    ]
    return "".join(lines)


class _WideHelp(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=100, max_help_position=32)


# -- metrics ------------------------------------------------------------------------------

_SUFFIX = {"counter": "_total"}


def metric_families() -> Iterator[tuple[str, str, str, tuple[str, ...]]]:
    """(exported name, type, help, label names) of every family a server registers. The
    label names are read from prometheus_client's metric and family objects, which keep
    them in `_labelnames`."""
    metrics = Metrics()
    metrics.watch_serving(lambda: True, 1, 1)
    metrics.watch_costs(list)
    metrics.watch_statistics(list)
    for collector in list(metrics.registry._collector_to_names):
        labels = tuple(getattr(collector, "_labelnames", ()))
        for family in collector.collect():
            names = labels or tuple(getattr(family, "_labelnames", ()))
            yield (
                family.name + _SUFFIX.get(family.type, ""),
                family.type,
                family.documentation,
                names,
            )


def metrics_page() -> str:
    lines = [
        "# Metrics\n\n",
        GENERATED,
        "Prometheus text on `http://HOST:9400/metrics` (`--metrics-port`; 0 turns it off). "
        "With `--frontends N` there is still one endpoint for the whole server, and every "
        "sample also has a `process` label (`engine`, `frontend-0`, `frontend-1`, ...): sum "
        "over it for totals. What to watch, and the dashboard and alerts built on these, are "
        "in [Operations](../user-guide/operations.md).\n\n",
        "A histogram exports `_bucket` (with `le`), `_sum` and `_count` series; a counter its "
        "`_total` series. Both also export a `_created` gauge: when the series began, in "
        "seconds since the epoch.\n\n",
        "| metric | type | labels | what it measures |\n",
        "|---|---|---|---|\n",
    ]
    for name, kind, documentation, labels in sorted(metric_families()):
        shown = ", ".join(f"`{label}`" for label in labels) or "—"
        lines.append(f"| `{name}` | {kind} | {shown} | {cell(documentation)} |\n")
    return "".join(lines)


# -- the native protocol ------------------------------------------------------------------

# Field numbers of descriptor.proto, as protoc's SourceCodeInfo paths use them.
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6
_FIELD, _NESTED_MESSAGE, _NESTED_ENUM, _VALUE, _METHOD = 2, 3, 4, 2, 2
_TYPE_NAMES = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in descriptor_pb2.FieldDescriptorProto.Type.items()
}


def proto_file(proto: str) -> descriptor_pb2.FileDescriptorProto:
    """The descriptor of one .proto file, with its comments (protoc's source info)."""
    include = Path(protoc.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "set.pb"
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", "--include_source_info",
                f"--descriptor_set_out={out}", str(PROTO_ROOT / proto)]  # fmt: skip
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return files.file[0]


def comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    found = {}
    for location in file.source_code_info.location:
        text = location.leading_comments or location.trailing_comments
        if text.strip():
            found[tuple(location.path)] = " ".join(text.split())
    return found


def field_type(field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type_name:
        name = field.type_name.rsplit(".", 1)[-1]
        shown = f"[`{name}`](#{name.lower()})"
    else:
        shown = f"`{_TYPE_NAMES[field.type]}`"
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return f"repeated {shown}"
    return f"optional {shown}" if field.proto3_optional else shown


def enum_section(enum, path: tuple[int, ...], said: dict, level: str) -> list[str]:
    lines = [f"{level} {enum.name}\n\n"]
    if path in said:
        lines.append(cell(said[path]) + "\n\n")
    lines += ["| value | number | meaning |\n", "|---|---|---|\n"]
    for i, value in enumerate(enum.value):
        meaning = said.get((*path, _VALUE, i), "")
        lines.append(f"| `{value.name}` | {value.number} | {cell(meaning)} |\n")
    return [*lines, "\n"]


def message_section(message, path: tuple[int, ...], said: dict) -> list[str]:
    lines = [f"### {message.name}\n\n"]
    if path in said:
        lines.append(cell(said[path]) + "\n\n")
    if message.field:
        lines += ["| field | type | number | meaning |\n", "|---|---|---|---|\n"]
        for i, field in enumerate(message.field):
            meaning = said.get((*path, _FIELD, i), "")
            lines.append(f"| `{field.name}` | {field_type(field)} | {field.number} | "
                         f"{cell(meaning)} |\n")  # fmt: skip
        lines.append("\n")
    else:
        lines.append("No fields.\n\n")
    for i, nested in enumerate(message.enum_type):
        lines += enum_section(nested, (*path, _NESTED_ENUM, i), said, "####")
    for i, nested in enumerate(message.nested_type):
        lines += message_section(nested, (*path, _NESTED_MESSAGE, i), said)
    return lines


def protocol_page() -> str:
    file = proto_file(NATIVE_PROTO)
    said = comments(file)
    lines = [
        "# Native protocol\n\n",
        GENERATED,
        f"`protos/{NATIVE_PROTO}`, package `{file.package}`. Any gRPC language can call it "
        "from the `.proto` alone; the Python SDK wraps it "
        "([Python SDK](sdk.md)). The standard protocol (KServe v2 / Triton) is served on "
        "the same port: [Protocols](../user-guide/protocols.md).\n\n",
    ]
    header = said.get((12,))  # the comment above `syntax`
    if header:
        lines.append(cell(header) + "\n\n")
    for s, service in enumerate(file.service):
        lines += [f"## Service {file.package}.{service.name}\n\n"]
        if (_SERVICE, s) in said:
            lines.append(cell(said[(_SERVICE, s)]) + "\n\n")
        lines += ["| RPC | request | response | what it does |\n", "|---|---|---|---|\n"]
        for m, method in enumerate(service.method):
            request = method.input_type.rsplit(".", 1)[-1]
            response = method.output_type.rsplit(".", 1)[-1]
            request = (
                f"{'stream ' if method.client_streaming else ''}[`{request}`](#{request.lower()})"
            )
            response = (
                f"{'stream ' if method.server_streaming else ''}[`{response}`](#{response.lower()})"
            )
            meaning = said.get((_SERVICE, s, _METHOD, m), "")
            lines.append(f"| `{method.name}` | {request} | {response} | {cell(meaning)} |\n")
        lines.append("\n")
    lines.append("## Messages\n\n")
    for i, message in enumerate(file.message_type):
        lines += message_section(message, (_MESSAGE, i), said)
    lines.append("## Enums\n\n")
    for i, enum in enumerate(file.enum_type):
        lines += enum_section(enum, (_ENUM, i), said, "###")
    return "".join(lines)


# -- REST ---------------------------------------------------------------------------------


def rest_page() -> str:
    document = openapi.document([], "", HEADER_LENGTH)
    lines = [
        "# REST endpoints\n\n",
        GENERATED,
        "The standard inference protocol over HTTP/JSON, on `--http-port` (8000). A running "
        "server serves the whole OpenAPI 3.0 document, with the names of the models it "
        "serves, at `GET /v2/openapi.json`; this page lists its endpoints and the inference "
        "request's parameters. How to use them, binary tensors and bounds: "
        "[Protocols](../user-guide/protocols.md).\n\n",
        "| method | path | what it answers | statuses |\n",
        "|---|---|---|---|\n",
    ]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            statuses = ", ".join(sorted(operation["responses"]))
            lines.append(f"| {method.upper()} | `{path}` | {cell(operation['summary'])} | "
                         f"{statuses} |\n")  # fmt: skip
    lines += [
        "\n## Inference request parameters\n\n",
        "The `parameters` object of `POST .../infer`; the same names are request parameters "
        "of the standard protocol over gRPC.\n\n",
        "| parameter | type | meaning |\n",
        "|---|---|---|\n",
    ]
    parameters = document["components"]["schemas"]["Parameters"]["properties"]
    for name, schema in parameters.items():
        meaning = schema.get("description", "")
        if "enum" in schema:
            meaning += ": " + ", ".join(f"`{value}`" for value in schema["enum"])
        lines.append(f"| `{name}` | {schema.get('type', '')} | {cell(meaning)} |\n")
    return "".join(lines)


PAGES = {"flags": flags_page, "metrics": metrics_page, "protocol": protocol_page, "rest": rest_page}
for page, write in PAGES.items():
    with mkdocs_gen_files.open(f"reference/{page}.md", "w") as out:
        out.write(write())
