"""Fuzz the HTTP API from its own OpenAPI document: no answer may be a 5xx.

Starts ``supervisor start`` on a free loopback port (or uses ``--url`` of a running server) and
runs two phases, each bounded, exiting non-zero on any server error:

1. **schemathesis**' example and fuzzing phases over every operation (``osc/stream`` left out:
   an endless event stream), a bounded number of examples each;
2. **hostile bodies** schemathesis does not make, for every operation that takes a JSON body:
   the body and each of its properties nested 5,000 deep; each property given every JSON type
   in turn (type confusion) starting from a body of the right shape; a body one byte over the
   limit and a property of 900 KB. A 4xx is the right answer to all of them.

The suite runs it (``tests/test_fuzz_api.py``)::

    python scripts/fuzz_api.py --examples 25 --time-limit 240
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ENDLESS = "/api/v1/osc/stream"
DEEP = 5000
#: A value of every JSON type, and a few edges of each.
CONFUSION: list[Any] = [None, True, 0, -1, 1e308, "x", "", "x" * 10_000, [], [1, "a"], {}, {"a": 1}]
BODY_LIMIT = 1024 * 1024  # the default [api] max_body_bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/openapi.json", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"fuzz_api: no server at {url} after {timeout_s:.0f} s") from None
            time.sleep(0.2)


def run_phases(url: str, examples: int, time_limit_s: float) -> int:
    """schemathesis for two thirds of the time, the hostile bodies for the rest."""
    code = fuzz(url, examples, time_limit_s * 2 / 3)
    return code or (1 if hostile(url, time_limit_s / 3) else 0)


def fuzz(url: str, examples: int, time_limit_s: float) -> int:
    """schemathesis' CLI, run in a scratch directory: it keeps a cache where it runs."""
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(examples),
        "--exclude-path",
        ENDLESS,
        "--request-timeout",
        "20",
        "--phases",
        "examples,fuzzing",
        "--generation-deterministic",
    ]
    try:
        with tempfile.TemporaryDirectory(prefix="dwfz") as scratch:
            run = subprocess.run(command, timeout=time_limit_s, check=False, cwd=scratch)
            return run.returncode
    except subprocess.TimeoutExpired:
        print(f"fuzz_api: stopped after {time_limit_s:.0f} s (the time limit)", file=sys.stderr)
        return 0  # bounded on purpose: what ran found no server error


def resolve(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        schema = spec["components"]["schemas"][name]
    if "anyOf" in schema:  # X | None: the non-null branch
        branches = [b for b in schema["anyOf"] if b.get("type") != "null"]
        schema = resolve(branches[0], spec) if branches else {}
    return schema


def shaped(schema: dict[str, Any], spec: dict[str, Any], depth: int = 0) -> Any:
    """A value of the schema's shape: required properties filled, minimal values."""
    schema = resolve(schema, spec)
    if "default" in schema:
        return schema["default"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {
            k: shaped(props[k], spec, depth + 1) for k in schema.get("required", []) if k in props
        }
    if kind == "array":
        return [shaped(schema.get("items", {}), spec, depth + 1)] if schema.get("minItems") else []
    return {"string": "x", "integer": 1, "number": 1.0, "boolean": False}.get(str(kind), "x")


def nested(depth: int) -> str:
    """Arrays in arrays, then objects in objects: both kinds of deep JSON."""
    half = depth // 2
    return "[" * half + '{"a":' * half + "1" + "}" * half + "]" * half


def hostile_requests(spec: dict[str, Any]) -> list[tuple[str, str, str, bytes]]:
    """(label, method, path, body) for every operation with a JSON body."""
    out: list[tuple[str, str, str, bytes]] = []
    for path, item in spec["paths"].items():
        concrete = path.replace("{sessionId}", "nope").replace("{session_id}", "nope")
        concrete = concrete.replace("{", "").replace("}", "")
        for method, op in item.items():
            content = (op.get("requestBody") or {}).get("content", {}).get("application/json")
            if content is None or path == ENDLESS:
                continue
            schema = resolve(content.get("schema", {}), spec)
            base = shaped(schema, spec)
            m = method.upper()
            out.append(("deep body", m, concrete, nested(DEEP).encode()))
            out.append(("deep member", m, concrete, ('{"x": ' + nested(DEEP) + "}").encode()))
            out.append(("over the limit", m, concrete, b'{"a": "' + b"x" * BODY_LIMIT + b'"}'))
            props = list(schema.get("properties", {})) if isinstance(base, dict) else []
            for prop in props:
                deep = json.dumps({**base, prop: "@DEEP@"}).replace('"@DEEP@"', nested(DEEP))
                out.append((f"{prop} deep", m, concrete, deep.encode()))
                out.append(
                    (
                        f"{prop} 900 KB",
                        m,
                        concrete,
                        json.dumps({**base, prop: "x" * 900_000}).encode(),
                    )
                )
                for value in CONFUSION:
                    body = json.dumps({**base, prop: value}).encode()
                    out.append((f"{prop}={json.dumps(value)[:20]}", m, concrete, body))
    return out


def hostile(url: str, time_limit_s: float) -> int:
    """Phase 2: the hostile bodies; the number of server errors."""
    with urllib.request.urlopen(url + "/openapi.json", timeout=10) as resp:
        spec = json.load(resp)
    cases = hostile_requests(spec)
    deadline = time.monotonic() + time_limit_s
    errors = sent = 0
    statuses: dict[int, int] = {}
    for label, method, path, body in cases:
        if time.monotonic() > deadline:
            print(f"fuzz_api: hostile bodies stopped after {time_limit_s:.0f} s", file=sys.stderr)
            break
        request = urllib.request.Request(
            url + path, data=body, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=20) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError as exc:
            status = 599
            print(f"fuzz_api: {method} {path} ({label}): {exc}", file=sys.stderr)
        sent += 1
        statuses[status] = statuses.get(status, 0) + 1
        if status >= 500:
            errors += 1
            print(f"fuzz_api: {method} {path} ({label}) answered {status}", file=sys.stderr)
    answers = ", ".join(f"{n} × {code}" for code, n in sorted(statuses.items()))
    print(f"hostile bodies: {sent} sent ({answers}), {errors} server errors")
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--examples", type=int, default=25, help="examples per operation")
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds in all")
    args = parser.parse_args()
    if args.url:
        return run_phases(args.url.rstrip("/"), args.examples, args.time_limit)
    base = Path(tempfile.mkdtemp(prefix="dwfz", dir="/tmp"))
    port = free_port()
    (base / "dreamwire.toml").write_text(f"port = {port}\n[api.ice]\nstun_urls = []\n")
    env = {**os.environ, "DREAMWIRE_RUN_DIR": str(base / "run"), "DREAMWIRE_HOME": str(base)}
    log = (base / "supervisor.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "start", "--config", str(base / "dreamwire.toml")],
        env=env,
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 60)
        code = run_phases(url, args.examples, args.time_limit)
        if server.poll() is not None:
            print("fuzz_api: the server died during the run", file=sys.stderr)
            code = code or 1
        return code
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        if "Traceback" in (base / "supervisor.log").read_text():
            print((base / "supervisor.log").read_text()[-4000:], file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
