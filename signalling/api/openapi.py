"""OpenAPI 3.1 document and a readable HTML page, both built from the route table.

Every route in ``routes.py`` is one ``Operation`` naming its request type and its response
types; the schemas come from the same msgspec Structs the handlers decode and encode with
(``msgspec.json.schema_components``), so the document cannot drift from the code.

``GET /docs`` renders the document server-side into one self-contained HTML page (inline CSS,
no scripts, no external assets) because Swagger UI needs its JavaScript from a CDN, unreachable
on offline machines. Where a CDN is reachable, any Swagger UI or Redoc page pointed at
``/openapi.json`` works as well; that is optional and not served here.
"""

from __future__ import annotations

import html
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from signalling.api.types import ErrorResponse

__all__ = ["Operation", "QueryParam", "Resp", "build_openapi", "render_docs_html"]

REF_PREFIX = "#/components/schemas/"
JSON = "application/json"
HTML = "text/html"
_ERR = ErrorResponse


@dataclass(frozen=True, slots=True)
class Resp:
    description: str
    body: Any = None  # a msgspec-encodable type, or None for no body
    media_type: str = JSON


@dataclass(frozen=True, slots=True)
class QueryParam:
    name: str
    description: str
    required: bool = True
    #: The JSON Schema of the value, as the handler checks it.
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string", "minLength": 1})


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str
    tag: str
    request: Any = None  # a msgspec Struct type, or None for no body
    responses: Mapping[int, Resp] = field(default_factory=dict)
    query: tuple[QueryParam, ...] = ()
    description: str = ""
    #: An endless response (server-sent events): no HEAD route.
    streams: bool = False

    @property
    def operation_id(self) -> str:
        return self.handler.__name__.lstrip("_")

    def all_responses(self) -> dict[int, Resp]:
        """Declared responses plus the errors every route can give."""
        out = dict(self.responses)
        if self.request is not None:
            out.setdefault(
                400, Resp("Malformed JSON or wrong shape (names the field)", ErrorResponse)
            )
            out.setdefault(413, Resp("Body larger than the configured limit", _ERR))
        out.setdefault(500, Resp("Internal error", _ERR))
        return dict(sorted(out.items()))


def build_openapi(operations: list[Operation], *, title: str, version: str) -> dict[str, Any]:
    types: list[Any] = []
    for op in operations:
        if op.request is not None and op.request not in types:
            types.append(op.request)
        for resp in op.all_responses().values():
            if resp.body is not None and resp.body not in types:
                types.append(resp.body)
    schemas, components = msgspec.json.schema_components(types, ref_template=REF_PREFIX + "{name}")
    schema_of = dict(zip(map(_type_key, types), schemas, strict=True))

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        entry: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "tags": [op.tag],
        }
        if op.description:
            entry["description"] = op.description
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", op.path)
        ]
        params += [
            {
                "name": q.name,
                "in": "query",
                "required": q.required,
                "description": q.description,
                "schema": dict(q.schema),
            }
            for q in op.query
        ]
        if params:
            entry["parameters"] = params
        if op.request is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {JSON: {"schema": schema_of[_type_key(op.request)]}},
            }
        responses: dict[str, Any] = {}
        for status, resp in op.all_responses().items():
            answer: dict[str, Any] = {"description": resp.description}
            if resp.body is not None:
                answer["content"] = {resp.media_type: {"schema": schema_of[_type_key(resp.body)]}}
            responses[str(status)] = answer
        entry["responses"] = responses
        paths.setdefault(op.path, {})[op.method.lower()] = entry

    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }


def _type_key(tp: Any) -> str:
    return repr(tp)


# --- HTML ------------------------------------------------------------------------------------

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;
color:#1d1d1f}
h1{margin-bottom:.2rem}h2{margin-top:2.5rem;border-bottom:1px solid #ddd}
.op{border:1px solid #ddd;border-radius:6px;margin:1rem 0;padding:.6rem 1rem}
.m{display:inline-block;min-width:4.5rem;font-weight:700;font-family:monospace}
.get{color:#0a6}.post{color:#06c}.patch{color:#b60}.delete{color:#c22}.head{color:#666}
code,.path{font-family:ui-monospace,monospace}.path{font-weight:600}
table{border-collapse:collapse;margin:.4rem 0}td,th{border:1px solid #e3e3e3;padding:.2rem .5rem;
text-align:left;vertical-align:top}th{background:#f6f6f6}.muted{color:#777}
"""


def _schema_label(schema: Mapping[str, Any]) -> str:
    """A short HTML rendering of a schema's type, linking to components."""
    if "$ref" in schema:
        name = str(schema["$ref"]).removeprefix(REF_PREFIX)
        return f'<a href="#schema-{html.escape(name)}">{html.escape(name)}</a>'
    if "anyOf" in schema:
        return " | ".join(_schema_label(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(f"<code>{html.escape(repr(v))}</code>" for v in schema["enum"])
    if "const" in schema:
        return f"<code>{html.escape(repr(schema['const']))}</code>"
    kind = schema.get("type", "any")
    if kind == "array" and "items" in schema:
        return f"array of {_schema_label(schema['items'])}"
    if kind == "object" and "additionalProperties" in schema:
        return f"object of {_schema_label(schema['additionalProperties'])}"
    return html.escape(str(kind))


def _render_operation(path: str, method: str, op: Mapping[str, Any]) -> str:
    parts = [
        f'<div class="op" id="{html.escape(op["operationId"])}">',
        f'<span class="m {method}">{method.upper()}</span> '
        f'<span class="path">{html.escape(path)}</span>',
        f"<p>{html.escape(op['summary'])}</p>",
    ]
    if "description" in op:
        parts.append(f'<p class="muted">{html.escape(op["description"])}</p>')
    if op.get("parameters"):
        param_rows = "".join(
            f"<tr><td><code>{html.escape(p['name'])}</code></td><td>{p['in']}</td>"
            f"<td>{'yes' if p['required'] else 'no'}</td>"
            f"<td>{html.escape(p.get('description', ''))}</td></tr>"
            for p in op["parameters"]
        )
        parts.append(
            "<table><tr><th>parameter</th><th>in</th><th>required</th><th></th></tr>"
            f"{param_rows}</table>"
        )
    if "requestBody" in op:
        schema = op["requestBody"]["content"][JSON]["schema"]
        parts.append(f"<p>Request body (JSON): {_schema_label(schema)}</p>")
    rows = []
    for status, resp in op["responses"].items():
        body = ""
        for media, content in resp.get("content", {}).items():
            body = f"{_schema_label(content['schema'])} <span class='muted'>({media})</span>"
        rows.append(
            f"<tr><td>{status}</td><td>{html.escape(resp['description'])}</td><td>{body}</td></tr>"
        )
    parts.append(
        "<table><tr><th>status</th><th>meaning</th><th>body</th></tr>" + "".join(rows) + "</table>"
    )
    parts.append("</div>")
    return "\n".join(parts)


def _render_component(name: str, schema: Mapping[str, Any]) -> str:
    out = [f'<h3 id="schema-{html.escape(name)}"><code>{html.escape(name)}</code></h3>']
    if "description" in schema:
        out.append(f"<p>{html.escape(schema['description'])}</p>")
    props = schema.get("properties")
    if props:
        required = set(schema.get("required", ()))
        rows = []
        for prop, sub in props.items():
            notes = []
            for key in ("minimum", "maximum", "exclusiveMinimum", "minLength"):
                if key in sub:
                    notes.append(f"{key} {sub[key]!r}")
            if "default" in sub:
                notes.append(f"default {msgspec.json.encode(sub['default']).decode()}")
            desc = sub.get("description", "")
            rows.append(
                f"<tr><td><code>{html.escape(prop)}</code></td><td>{_schema_label(sub)}</td>"
                f"<td>{'yes' if prop in required else 'no'}</td>"
                f"<td>{html.escape(desc)} <span class='muted'>{html.escape('; '.join(notes))}"
                "</span></td></tr>"
            )
        out.append(
            "<table><tr><th>field</th><th>type</th><th>required</th><th></th></tr>"
            + "".join(rows)
            + "</table>"
        )
    else:
        out.append(f"<p>{_schema_label(schema)}</p>")
    return "\n".join(out)


def render_docs_html(doc: Mapping[str, Any]) -> str:
    info = doc["info"]
    title = html.escape(f"{info['title']} {info['version']}")
    by_tag: dict[str, list[str]] = {}
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            by_tag.setdefault(op["tags"][0], []).append(_render_operation(path, method, op))
    sections = [f"<h2>{html.escape(tag)}</h2>\n" + "\n".join(ops) for tag, ops in by_tag.items()]
    components = "\n".join(
        _render_component(name, schema)
        for name, schema in sorted(doc["components"]["schemas"].items())
    )
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{title}</h1>\n"
        "<p class='muted'>Generated from <a href='/openapi.json'>/openapi.json</a>. "
        'Errors are JSON <code>{"error": code, "detail": text}</code>; a refused offer '
        "over the session limit answers 429 with FastRTC's body.</p>\n"
        + "\n".join(sections)
        + "\n<h2>Schemas</h2>\n"
        + components
        + "\n</body></html>\n"
    )
