"""Who is who in a running system, and what chain of stages a session's frames pass.

Torch-free: the supervisor, signalling and the services all import it. Service names are made
here and nowhere else; :func:`plan_chain` turns the loaded pipelines (and those a client asked
for) into a :class:`Chain`: its pipelines in order, the processes its frames pass, and which of
them take the session's runtime parameters.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import msgspec

SIGNALLING = "signalling"
DECODE = "decode"
ENCODE = "encode"
#: The Moondream overlay: one process for every overlay pipeline.
OVERLAY = "overlay"
INFERENCE_PREFIX = "inference/"
#: A Dreams worker the supervisor runs for signalling's hub (``dreams-worker/<name>``): not a
#: service of the control protocol, a plain child process.
DREAMS_WORKER = "dreams-worker"
#: The front's link to its media nodes on other hosts (a ROUTER on TCP with CURVE).
NODES = "nodes"
#: A media node's link to its front (runs in the node's supervisor).
NODE_LINK = "node-link"
#: Kinds of service process (``ServiceSpec.kind``); an inference service is named per pipeline.
MEDIA_KINDS = frozenset({DECODE, ENCODE})
PIPELINE_KINDS = frozenset({"inference", OVERLAY})


def inference_service(pipeline_id: str) -> str:
    return INFERENCE_PREFIX + pipeline_id


def service_of_pipeline(pipeline_id: str, overlays: Collection[str]) -> str:
    """The process a pipeline runs in: ``overlay`` for the ``overlays`` (pipelines that draw on
    the frames of another, or the camera's: ``registry.overlays()``), else ``inference/<id>``."""
    return OVERLAY if pipeline_id in overlays else inference_service(pipeline_id)


def dreams_worker_service(name: str) -> str:
    return f"{DREAMS_WORKER}/{name}"


def stage_kind(stage: str) -> str:
    """What a stage of a chain is, wherever it runs: ``decode``, ``encode``, ``overlay`` or
    ``inference/<id>`` (a device's process, a node's stage)."""
    return split_device(split_node(stage)[1])[0]


def kind_of_service(name: str) -> str:
    for kind in ("inference", DREAMS_WORKER):
        if name.startswith(kind + "/"):
            return kind
    return name


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


DEVICE_SEPARATOR = "@"


def device_service(pipeline_id: str, device: str) -> str:
    """``inference/<id>@cuda:N``: the pipeline's process on one device."""
    return f"{inference_service(pipeline_id)}{DEVICE_SEPARATOR}{device}"


def split_device(service: str) -> tuple[str, str | None]:
    """(``inference/<id>``, ``cuda:N``) of a per-device service; (name, None) otherwise."""
    name, sep, device = service.partition(DEVICE_SEPARATOR)
    return (name, device) if sep else (service, None)


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


NODE_PREFIX = "node/"


def node_service(node: str, service: str) -> str:
    """``node/<name>/<service>``: a stage of a session placed on a media node, as the front
    names it (the front's link binds its inbox and carries what arrives there to the node)."""
    return f"{NODE_PREFIX}{node}/{service}"


def split_node(stage: str) -> tuple[str | None, str]:
    """(node, the node's own name for it) of a node stage; (None, stage) otherwise."""
    if not stage.startswith(NODE_PREFIX):
        return None, stage
    node, _, service = stage.removeprefix(NODE_PREFIX).partition("/")
    return node, service


def node_inboxes(pipelines: Sequence[str], overlays: Collection[str]) -> list[str]:
    """The stages a node running these pipelines may be given (the front's link binds them)."""
    services = (service_of_pipeline(pid, overlays) for pid in pipelines)
    return [DECODE, ENCODE, *dict.fromkeys(services)]
