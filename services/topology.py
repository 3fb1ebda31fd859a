"""Who is who in a running system, and what chain of stages a session's frames pass.

Torch-free: the supervisor, signalling and the services all import it. Service names are made
here and nowhere else; :func:`plan_chain` turns the loaded pipelines (and those a client asked
for) into a :class:`Chain`: its pipelines in order, the processes its frames pass, and which of
them take the session's runtime parameters.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import msgspec


class Kind(StrEnum):
    """What a process is (``ServiceSpec.kind``): the one spelling of each kind."""

    SIGNALLING = "signalling"
    DECODE = "decode"
    ENCODE = "encode"
    #: The Moondream overlay: one process for every overlay pipeline.
    OVERLAY = "overlay"
    #: One loaded pipeline (``inference/<pipeline_id>``, ``…@cuda:N`` per device).
    INFERENCE = "inference"
    #: A Dreams worker the supervisor runs for signalling's hub (``dreams-worker/<name>``): not
    #: a service of the control protocol, a plain child process.
    DREAMS_WORKER = "dreams-worker"
    #: The front's link to its media nodes on other hosts (a ROUTER on TCP with CURVE).
    NODES = "nodes"
    #: A media node's link to its front (runs in the node's supervisor).
    NODE_LINK = "node-link"
    #: Synthetic frames in and out (tests, benchmarks).
    TESTSRC = "testsrc"
    TESTSINK = "testsink"


SIGNALLING = Kind.SIGNALLING
DECODE = Kind.DECODE
ENCODE = Kind.ENCODE
OVERLAY = Kind.OVERLAY
INFERENCE = Kind.INFERENCE
DREAMS_WORKER = Kind.DREAMS_WORKER
NODES = Kind.NODES
NODE_LINK = Kind.NODE_LINK
MEDIA_KINDS = frozenset({Kind.DECODE, Kind.ENCODE})
PIPELINE_KINDS = frozenset({Kind.INFERENCE, Kind.OVERLAY})
#: Kinds whose processes are named ``<kind>/<name>``.
NAMED_KINDS = (Kind.INFERENCE, Kind.DREAMS_WORKER)

NODE_PREFIX = "node/"
DEVICE_SEPARATOR = "@"


@dataclass(frozen=True, slots=True)
class StageAddress:
    """A process as a chain names it, parsed once: ``[node/<node>/]<kind>[/<name>][@<device>]``
    (``decode``, ``inference/longlive@cuda:1``, ``node/gpu-a/encode``)."""

    kind: str
    #: The pipeline of an inference process, a Dreams worker's name.
    name: str | None = None
    device: str | None = None
    #: The media node (another host) the process runs on; None: this host.
    node: str | None = None

    @classmethod
    def parse(cls, text: str) -> StageAddress:
        node: str | None = None
        if text.startswith(NODE_PREFIX):
            node, _, text = text.removeprefix(NODE_PREFIX).partition("/")
        text, sep, device = text.partition(DEVICE_SEPARATOR)
        kind, slash, name = text.partition("/")
        return cls(kind, name if slash else None, device if sep else None, node)

    @property
    def process(self) -> str:
        """What it is wherever it runs: ``decode``, ``encode``, ``overlay``, ``inference/<id>``."""
        return self.kind if self.name is None else f"{self.kind}/{self.name}"

    @property
    def local(self) -> str:
        """The name on the host it runs on (a node's own name for its stage)."""
        return self.process + (DEVICE_SEPARATOR + self.device if self.device else "")

    def __str__(self) -> str:
        return (f"{NODE_PREFIX}{self.node}/" if self.node is not None else "") + self.local

    def on_node(self, node: str) -> StageAddress:
        return replace(self, node=node)


def inference_service(pipeline_id: str, device: str | None = None) -> str:
    """``inference/<id>``, or ``inference/<id>@cuda:N``: the pipeline's process on a device."""
    return str(StageAddress(Kind.INFERENCE, pipeline_id, device))


def service_of_pipeline(pipeline_id: str, overlays: Collection[str]) -> str:
    """The process a pipeline runs in: ``overlay`` for the ``overlays`` (pipelines that draw on
    the frames of another, or the camera's: ``registry.overlays()``), else ``inference/<id>``."""
    return OVERLAY if pipeline_id in overlays else inference_service(pipeline_id)


def dreams_worker_service(name: str) -> str:
    return str(StageAddress(Kind.DREAMS_WORKER, name))


def node_stage(node: str, stage: str) -> str:
    """``node/<node>/<stage>``: a stage placed on a media node, as the front names it (the
    front's link binds its inbox and carries what arrives there to the node)."""
    return str(StageAddress.parse(stage).on_node(node))


class ChainError(ValueError):
    """The asked pipelines make no chain; the message names ``pipeline_ids``."""


class Chain(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A session's path: its pipelines in order and the processes between decode and encode."""

    pipeline_ids: tuple[str, ...]
    #: The pipeline processes its frames pass; they take the session's runtime parameters.
    processing: tuple[str, ...]

    @property
    def pipeline_id(self) -> str:
        return self.pipeline_ids[0]

    def stages(self, mode: str) -> list[str]:
        """Every process a frame passes: decode (video only), the pipelines, encode."""
        head = [DECODE] if mode == "video" else []
        return [*head, *self.processing, ENCODE]


def plan_chain(
    loaded: Sequence[str], asked: Sequence[str] | None = None, *, overlays: Collection[str]
) -> Chain:
    """The chain the loaded pipelines make (or those of them ``asked`` for): the first model
    pipeline runs in its inference process; an overlay (one of ``overlays``) comes after it,
    or alone on the camera."""
    if not loaded:
        raise ChainError("pipeline_ids: no pipeline is loaded")
    chosen = list(dict.fromkeys(loaded))
    if asked is not None:
        if missing := [pid for pid in asked if pid not in chosen]:
            raise ChainError(
                f"pipeline_ids: {', '.join(missing)} not loaded (loaded: {', '.join(chosen)})"
            )
        chosen = list(dict.fromkeys(asked))
    models = [pid for pid in chosen if pid not in overlays]
    drawn = [pid for pid in chosen if pid in overlays]
    if asked is not None and (len(models) > 1 or len(drawn) > 1):
        raise ChainError(
            "pipeline_ids: a session runs one model pipeline and at most one overlay, "
            f"got {', '.join(asked)}"
        )
    pipelines = (*models[:1], *drawn[:1])
    processing = tuple(service_of_pipeline(pid, overlays) for pid in pipelines)
    return Chain(pipeline_ids=pipelines, processing=processing)


# ---------------------------------------------------------------- several GPUs


class Room(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one device's process of a pipeline reports (its heartbeats, a media node's beats):
    free device memory (None: not known, a CPU stand-in) and the sessions it serves."""

    service: str
    free_bytes: int | None
    sessions: int


def place(rooms: Sequence[Room]) -> str:
    """The process a new session goes to: the most free device memory, then the fewest
    sessions, then the name (the same answer for the same reports)."""
    if not rooms:
        raise ChainError("pipeline_ids: no device of the pipeline is ready")
    best = min(rooms, key=lambda r: (-(r.free_bytes or 0), r.sessions, r.service))
    return best.service


# ---------------------------------------------------------------- media nodes (other hosts)


def node_inboxes(pipelines: Sequence[str], overlays: Collection[str]) -> list[str]:
    """The stages a node running these pipelines may be given (the front's link binds them)."""
    services = (service_of_pipeline(pid, overlays) for pid in pipelines)
    return [DECODE, ENCODE, *dict.fromkeys(services)]
