"""Entry point of every service process: ``python -m services.main`` with the spec in env."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from services.runtime import SPEC_ENV, Outbox, ServiceCore, ServiceSpec, run_service
from services.topology import Kind

CoreFactory = Callable[[ServiceSpec, Outbox], ServiceCore[Any]]


def core_factory(kind: Kind) -> CoreFactory:
    """The core class for a service kind; imports lazily so each process loads only its own."""
    match kind:
        case Kind.INFERENCE:
            from services.inference.core import InferenceCore

            return InferenceCore
        case Kind.DECODE:
            from services.decode.service import DecodeStage

            return DecodeStage
        case Kind.ENCODE:
            from services.encode.service import EncodeStage

            return EncodeStage
        case Kind.OVERLAY:
            from services.overlay.core import OverlayCore

            return OverlayCore
        case Kind.NODES:
            from services.nodes.front import FrontLink

            return FrontLink
        case Kind.NODE_LINK:
            from services.nodes.node import NodeLink

            return NodeLink
        case Kind.TESTSRC:
            from services.synthetic import TestSourceCore

            return TestSourceCore
        case Kind.TESTSINK:
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
