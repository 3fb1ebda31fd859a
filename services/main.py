"""Entry point of every service process: ``python -m services.main`` with the spec in env."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from services.runtime import SPEC_ENV, Outbox, ServiceCore, ServiceSpec, run_service

CoreFactory = Callable[[ServiceSpec, Outbox], ServiceCore[Any]]


def core_factory(kind: str) -> CoreFactory:
    """The core class for a service kind; imports lazily so each process loads only its own."""
    match kind:
        case "inference":
            from services.inference.core import InferenceCore

            return InferenceCore
        case "decode":
            from services.decode.service import DecodeStage

            return DecodeStage
        case "encode":
            from services.encode.service import EncodeStage

            return EncodeStage
        case "overlay":
            from services.overlay.core import OverlayCore

            return OverlayCore
        case "nodes":
            from services.nodes.front import FrontLink

            return FrontLink
        case "node-link":
            from services.nodes.node import NodeLink

            return NodeLink
        case "testsrc":
            from services.synthetic import TestSourceCore

            return TestSourceCore
        case "testsink":
            from services.synthetic import TestSinkCore

            return TestSinkCore
    raise ValueError(f"unknown service kind {kind!r}")


def main() -> int:
    raw = os.environ.get(SPEC_ENV)
    if not raw:
        print(f"{SPEC_ENV} is not set: services are started by `supervisor start`", file=sys.stderr)
        return 2
    spec = msgspec.json.decode(raw, type=ServiceSpec)

    def build(spec: ServiceSpec, outbox: Outbox) -> ServiceCore[Any]:
        # Resolved inside the runtime, so an import error is reported as ServiceFailed.
        return core_factory(spec.kind)(spec, outbox)

    return run_service(spec, build)


if __name__ == "__main__":
    sys.exit(main())
