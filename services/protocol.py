"""Every message that crosses a process boundary in dreamwire.

Sockets and their unions (one long-lived encoder/decoder per socket, see :class:`Codec`):

* **control** — each service's DEALER ↔ the supervisor's ROUTER (``control.sock``):
  :data:`ServiceToSupervisor` up, :data:`SupervisorToService` down.
* **admin** — the CLI / tests' REQ ↔ the supervisor's ROUTER (``admin.sock``):
  :data:`AdminRequest` up, :data:`AdminReply` down.
* **inbox** — every service binds one PULL socket (``<service>.inbox``) that other services PUSH
  to: :data:`InboxMessage`. Per-frame messages are tiny (ring, seq), ``array_like`` and
  ``gc=False``; pixels never travel here, encoded video does.

Commands are imperative (``StartSession``), events past tense (``ServiceFailed``).
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

import msgspec

from services.topology import Room

# ---------------------------------------------------------------- control: service → supervisor


# ---------------------------------------------------------------- vocabulary

#: A session's kind: frames in and out (``video``), or generated from prompts (``text``).
Mode = Literal["video", "text"]
#: The video codecs a session can use on the wire.
VideoCodec = Literal["VP8", "H264"]
#: A pipeline as Scope's status reports it.
PipelineStatus = Literal["not_loaded", "loading", "loaded", "error"]
#: A supervised service (``supervisor.children.State``).
ServiceState = Literal["starting", "ready", "restarting", "failed", "stopping", "stopped"]
SupervisorPhase = Literal["starting", "running", "stopping"]
#: What a stage tells a session's client (FastRTC's message types).
OutputKind = Literal["fetch_output", "error", "warning", "log"]
#: Why a request was refused: ``unavailable``, the request is fine but the server lacks a
#: resource for it now (shared memory: the client gets 503 and may try again); ``invalid``, a
#: field of the request is wrong (the reason names it: 400); ``not_loaded``, no pipeline is
#: loaded for it (not yet, still loading, failed: Scope's "load first"); ``refused``, anything
#: else.
Refusal = Literal["refused", "unavailable", "invalid", "not_loaded"]


class Hello(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """A service's first message: who it is, proved by its pid (the supervisor spawned it) and
    the run's secret (from its spec). Only then does the supervisor route to its connection."""

    service: str
    pid: int
    secret: str = ""


class Ready(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    service: str


class LoraAdapter(msgspec.Struct, forbid_unknown_fields=True):
    """A LoRA on a loaded pipeline (Scope's ``loaded_lora_adapters`` item)."""

    path: str
    scale: float
    merge_mode: Literal["permanent_merge", "runtime_peft"]
    adapter_name: str


class HeartbeatAck(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    seq: int
    frames_done: int
    frames_waiting: int
    rejected: int
    sessions: int
    #: Free memory of the device the service computes on (CUDA); None: not a GPU service.
    memory_free_bytes: int | None = None
    #: A model process: how long the model call in progress has run (0: none runs; the ack
    #: then comes from the process's liveness thread), the longest of its recent calls, and
    #: how many calls it finished. The supervisor judges a call's progress by these.
    call_running_s: float = 0.0
    longest_call_s: float = 0.0
    calls_done: int = 0
    #: A model process's LoRAs, with their current scales.
    loras: list[LoraAdapter] = []
    #: A split block loop's recent median ms a block spends in each stage (encode,
    #: transformer, decode); empty for every other process.
    stage_ms: dict[str, float] = {}


class ServiceFailed(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    service: str
    reason: str


class SessionFailed(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """A stage could not serve one session; the others carry on."""

    session_id: str
    service: str
    reason: str


class SessionStarted(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    session_id: str
    service: str


# ---------------------------------------------------------------- control: supervisor → service


class Heartbeat(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    seq: int


class Stop(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    reason: str = ""


class StartSession(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """Serve a session: read ``input_ring`` (or the inbox), write ``output_ring``, notify
    ``downstream``'s inbox. Sent again to a restarted stage for every live session."""

    session_id: str
    width: int
    height: int
    input_ring: str | None = None
    output_ring: str | None = None
    downstream: str | None = None
    #: The pipeline's runtime parameters (validated against its schema).
    params: dict[str, Any] = {}
    #: "video" (frames come in) or "text" (the pipeline generates).
    mode: Mode = "video"
    #: The negotiated WebRTC codec, for decode and encode.
    codec: VideoCodec = "VP8"


class EndSession(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    session_id: str


class NodeReport(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """What the front's link (``nodes``) knows of one media node: sent on each of the node's
    beats, and once when it is lost (``up`` false, ``reason`` why)."""

    node: str
    up: bool
    reason: str = ""
    pipelines: list[PipelineState] = []
    #: Its ready pipeline processes (the node's own names for them).
    rooms: list[Room] = []
    #: The sessions the node serves now.
    sessions: list[str] = []
    #: Round trip of the link, measured by the node's pings.
    rtt_ms: float | None = None
    address: str = ""


ServiceToSupervisor = (
    Hello | Ready | HeartbeatAck | ServiceFailed | SessionFailed | SessionStarted | NodeReport
)


class WorkerExited(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """A Dreams worker the supervisor started for this service ended by itself."""

    name: str
    reason: str


class ToNode(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """For the front's link: carry this request to the media node ``node``'s supervisor."""

    node: str
    request: OpenSession | CloseSession | LoadPipelines


SupervisorToService = (
    Heartbeat | Stop | StartSession | EndSession | SessionFailed | WorkerExited | ToNode
)

# ---------------------------------------------------------------- admin: CLI → supervisor


class GetStatus(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    pass


class Shutdown(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    reason: str = "requested"


class OpenSession(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """Open a session in one step: plan its chain, take its size, mode and parameters, make
    its rings and start it in each stage; the answer (:class:`SessionOpened`) says what was
    chosen.

    From ``pipeline_ids`` (those of the loaded pipelines a client asked for, in order; empty:
    the loaded ones) the supervisor plans the chain (:func:`services.topology.plan_chain`),
    takes the size its first pipeline was loaded at (unless ``width`` and ``height`` are
    given), the first of ``modes`` that pipeline supports, and ``params`` over the session
    settings the pipelines were loaded with, sorted by Scope's policy
    (:meth:`services.inference.catalog.PipelineCatalog.sort`). ``stages`` instead names the
    services outright, with the size (synthetic chains in tests and benchmarks)."""

    session_id: str
    width: int = 0
    height: int = 0
    pipeline_ids: list[str] = []
    stages: list[str] = []
    sink: str | None = None
    params: dict[str, Any] = {}
    #: The modes the client's offer allows, the one it prefers first.
    modes: list[Mode] = msgspec.field(default_factory=lambda: ["video"])
    codec: VideoCodec = "VP8"
    #: The service told when a stage of the session fails (signalling, for the client).
    owner: str | None = None


class CloseSession(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    session_id: str


class PipelineLoad(msgspec.Struct, forbid_unknown_fields=True):
    pipeline_id: str
    load_params: dict[str, Any] = {}
    #: Which of ``load_params`` take effect only at load (the pipeline's ``load_params`` in its
    #: schema): a change of another key (a session setting Scope's UI sends with the load)
    #: keeps the running process. Empty: every key counts.
    load_keys: list[str] = []


class LoadPipelines(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """Make these the loaded pipelines: start (or restart with new load params) their
    inference processes, stop the others. Answered at once; loading is asynchronous."""

    pipelines: list[PipelineLoad]


class StartWorker(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """Start a Dreams worker (``python -m dreams.worker *args``) as a child of the supervisor;
    ``owner`` hears ``WorkerExited`` if it ends without being stopped. A worker of that name
    still running is replaced."""

    name: str
    args: list[str]
    #: Given to the worker in its environment, never on its command line.
    token: str = ""
    owner: str | None = None


class StopWorker(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """SIGTERM the worker, SIGKILL at the stop deadline; nothing to do if it is gone."""

    name: str


AdminRequest = (
    GetStatus | Shutdown | OpenSession | CloseSession | LoadPipelines | StartWorker | StopWorker
)

# ---------------------------------------------------------------- admin: supervisor → CLI


class ServiceStatus(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    state: ServiceState
    pid: int | None
    uptime_s: float
    restarts: int
    frames_done: int = 0
    rejected: int = 0
    sessions: int = 0
    last_error: str = ""
    # Measured by the supervisor (psutil; nvidia-smi where it exists) for the metrics (issue 5).
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    gpu_memory_bytes: int | None = None
    #: The device of a per-device inference process (``cuda:1``), and its free memory.
    device: str | None = None
    memory_free_bytes: int | None = None
    #: A split block loop's ms a block spends in each stage (``HeartbeatAck.stage_ms``).
    stage_ms: dict[str, float] = {}


class RingCounters(msgspec.Struct, forbid_unknown_fields=True):
    """A shared-memory ring between two stages (counters since the session opened)."""

    ring: str
    producer: str
    consumer: str
    slots: int
    published: int
    consumed: int
    skipped: int
    torn: int
    #: 1 while a published frame waits for the consumer, else 0 (latest frame wins).
    pending: int


class RingStatus(RingCounters, forbid_unknown_fields=True):
    """One session ring's counters, read by the supervisor (it owns every ring)."""

    session_id: str


class PipelineState(msgspec.Struct, forbid_unknown_fields=True):
    pipeline_id: str
    status: PipelineStatus
    load_params: dict[str, Any] = {}
    error: str | None = None
    #: Its LoRAs once loaded, their scales as they are now (a run-time change shows).
    loras: list[LoraAdapter] = []


class StatusReport(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    run_id: str
    pid: int
    uptime_s: float
    services: list[ServiceStatus]
    sessions: list[str]
    rejected: int
    #: starting (services still coming up in order: ``services`` lists those started so far)
    #: | running | stopping
    phase: SupervisorPhase
    pipelines: list[PipelineState] = []
    rings: list[RingStatus] = []
    #: The media nodes this front knows (a front with ``[nodes]``), as last reported.
    nodes: list[NodeReport] = []


class Ack(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    pass


class SessionOpened(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    session_id: str
    #: The processes the session's frames pass, in order; ``rings[i]`` joins stage i to i+1.
    stages: list[str]
    rings: list[str]
    pipeline_ids: list[str] = []
    width: int = 0
    height: int = 0
    mode: Mode = "video"
    #: The session's parameters as its stages got them (known keys, converted).
    params: dict[str, Any] = {}
    #: Keys of ``OpenSession.params`` no pipeline of the chain has: ignored.
    unknown: list[str] = []
    #: Load-time keys sent with the session: the pipelines run as they were loaded.
    load_time: list[str] = []


class Rejected(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    reason: str
    why: Refusal = "refused"
    #: ``invalid``: what is wrong, one ``"<field>: <what>"`` per field (``reason`` joins them).
    problems: list[str] = []


AdminReply = StatusReport | Ack | SessionOpened | Rejected

# ---------------------------------------------------------------- inbox: service → service


class FrameReady(msgspec.Struct, tag=True, array_like=True, gc=False):
    """A new frame was published in ``ring`` (the seq is informational: latest wins)."""

    session_id: str
    ring: str
    seq: int


class EncodedFrame(msgspec.Struct, tag=True, array_like=True, gc=False):
    """A complete encoded video frame from the network (signalling → decode)."""

    session_id: str
    codec: VideoCodec
    data: bytes
    pts: int
    keyframe: bool
    rtp_arrival_ns: int
    frame_complete_ns: int
    #: When a media node's link took it off the network (0: not through a node).
    node_in_ns: int = 0


class EncodedPacket(msgspec.Struct, tag=True, array_like=True, gc=False):
    """An encoded output packet (encode → signalling); pts in 1/90000 s."""

    session_id: str
    data: bytes
    pts: int
    keyframe: bool
    frame_number: int
    stamps: list[int]


class KeyframeNeeded(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Ask the receiver of this message to make/obtain a keyframe for the session."""

    session_id: str


class FramesDropped(msgspec.Struct, tag=True, array_like=True, gc=False):
    """A stage lost frames of a session that no ring counter sees (a stage → signalling, which
    keeps the metrics): decode's payloads that gave no picture (decoder errors, deltas before
    the first keyframe), encode's frames the encoder dropped. ``stage`` is the metrics stage."""

    session_id: str
    stage: str
    count: int


class BitrateChanged(msgspec.Struct, tag=True, array_like=True, gc=False):
    session_id: str
    bitrate_bps: int


RecordAction = Literal["start", "cut", "stop"]


class RecordCommand(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Record a session's encoded output (signalling → encode): ``start`` a file at
    ``path``; ``cut`` (finish the file, go on in ``path``); ``stop``. The limits end a file
    by themselves (sizes in bytes)."""

    session_id: str
    action: RecordAction
    path: str = ""
    max_bytes: int = 0
    max_seconds: float = 0.0
    min_free_bytes: int = 0


class RecordingFinished(msgspec.Struct, tag=True, array_like=True, gc=False):
    """A recording's file is complete (encode → signalling); ``reason`` says why it ended
    (``stopped``, ``cut``, ``session ended``, a limit or an error)."""

    session_id: str
    path: str
    frames: int
    size_bytes: int
    duration_s: float
    reason: str


class UpdateParameters(msgspec.Struct, tag=True, array_like=True, gc=False):
    """New values for some of a session's runtime parameters (signalling → a stage).

    Already validated against the pipeline's schema; the newest value of each key wins."""

    session_id: str
    params: dict[str, Any]


class StageOutput(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Something a stage wants the session's client to hear (a stage → signalling).

    ``kind`` is the FastRTC message type: ``fetch_output`` (results as data, e.g. Moondream's
    captions and boxes), ``error``, ``warning`` or ``log``."""

    session_id: str
    service: str
    kind: OutputKind
    data: Any


InboxMessage = (
    FrameReady
    | EncodedFrame
    | EncodedPacket
    | KeyframeNeeded
    | FramesDropped
    | BitrateChanged
    | UpdateParameters
    | StageOutput
    | RecordCommand
    | RecordingFinished
)
#: What each kind of service takes in its inbox: anything else is refused when decoded.
DecodeInbox = EncodedFrame
EncodeInbox = FrameReady | KeyframeNeeded | BitrateChanged | RecordCommand
#: inference, overlay and the synthetic stages: frames from the ring, the session's parameters.
StageInbox = FrameReady | UpdateParameters
SignallingInbox = EncodedPacket | KeyframeNeeded | FramesDropped | StageOutput | RecordingFinished


class NoMessages(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """The inbox of a service no other service writes to (the media-node links: their
    traffic is their own sockets'): nothing sent there decodes."""


LinkInbox = NoMessages

# ---------------------------------------------------------------- codecs

In = TypeVar("In")
Out = TypeVar("Out")


class MessageRejected(ValueError):
    """Bytes that are not a valid message for this socket."""


class Codec(Generic[In, Out]):
    """One long-lived msgpack encoder + decoder for one side of a socket.

    ``In`` is the union this side receives, ``Out`` the union it sends.
    """

    def __init__(self, incoming: Any, outgoing: Any) -> None:
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(incoming)
        self._encoder = msgspec.msgpack.Encoder()
        self._outgoing = outgoing

    def encode(self, message: Out) -> bytes:
        return self._encoder.encode(message)

    def decode(self, data: bytes | memoryview) -> In:
        try:
            return self._decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise MessageRejected(str(exc)) from None


def service_control_codec() -> Codec[SupervisorToService, ServiceToSupervisor]:
    return Codec(SupervisorToService, ServiceToSupervisor)


def supervisor_control_codec() -> Codec[ServiceToSupervisor, SupervisorToService]:
    return Codec(ServiceToSupervisor, SupervisorToService)


def admin_client_codec() -> Codec[AdminReply, AdminRequest]:
    return Codec(AdminReply, AdminRequest)


def admin_server_codec() -> Codec[AdminRequest, AdminReply]:
    return Codec(AdminRequest, AdminReply)


def inbox_codec(accepts: Any = InboxMessage) -> Codec[Any, InboxMessage]:
    """Sends any inbox message; decodes only those of ``accepts`` (the receiver's union)."""
    return Codec(accepts, InboxMessage)
