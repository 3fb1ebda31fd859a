"""Entry point of every service process: ``python -m services.main`` with the spec in env."""

from __future__ import annotations

import os
import sys
from typing import Any

import msgspec

from services.runtime import (
    SPEC_ENV,
    CoreFactory,
    Outbox,
    ServiceCore,
    ServiceProc,
    ServiceSpec,
    run_service,
)
from services.topology import Kind


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
        case Kind.TESTSRC:
            from services.synthetic import TestSourceCore

            return TestSourceCore
        case Kind.TESTSINK:
            from services.synthetic import TestSinkCore

            return TestSinkCore
    raise ValueError(f"unknown service kind {kind!r}")


def proc_class(kind: Kind) -> type[ServiceProc]:
    """The process around a kind's core: a media-node link's owns its network sockets."""
    match kind:
        case Kind.NODES:
            from services.nodes.front import FrontProc

            return FrontProc
        case Kind.NODE_LINK:
            from services.nodes.node import NodeProc

            return NodeProc
    return ServiceProc


def main() -> int:
    raw = os.environ.get(SPEC_ENV)
    if not raw:
        print(f"{SPEC_ENV} is not set: services are started by `supervisor start`", file=sys.stderr)
        return 2
    spec = msgspec.json.decode(raw, type=ServiceSpec)

    def build(spec: ServiceSpec, outbox: Outbox) -> ServiceCore[Any]:
        # Resolved inside the runtime, so an import error is reported as ServiceFailed.
        return core_factory(spec.kind)(spec, outbox)

    return run_service(spec, build, proc_class(spec.kind))


if __name__ == "__main__":
    sys.exit(main())
