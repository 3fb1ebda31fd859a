"""The one typed config tree, loaded and validated once by the supervisor.

Every environment variable dreamwire reads is declared in :data:`ENVIRONMENT`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

import msgspec

from services.options import DecodeOptions, EncodeOptions, RecordingOptions
from services.topology import Kind
from signalling.api.config import ApiConfig
from signalling.dreams.config import DreamsConfig

ENVIRONMENT: dict[str, str] = {
    "DREAMWIRE_RUN_DIR": "where run directories (sockets, locks) live; default "
    "$XDG_RUNTIME_DIR/dreamwire or ~/.dreamwire/run",
    "DREAMWIRE_LOG_LEVEL": "log level of every process (default INFO)",
    "DREAMWIRE_HOME": "the user's dreamwire directory: the web UI's stored answers "
    "(default ~/.dreamwire)",
    "DREAMWIRE_MODELS_DIR": "where model files live (default ~/.dreamwire/models)",
    "DREAMWIRE_PIPELINES": "extra pipeline plugins without an installed distribution: "
    "id=module:attr,… (each attr a PipelineSpec)",
    "DREAMWIRE_TORCH_COMPILE": "1: torch.compile the models at load (slower start, faster calls)",
    "DREAMWIRE_CHROMIUM": "the browser the browser tests drive (default /usr/bin/chromium)",
    "DREAM_GEN_AUTH_TOKEN": "shared secret of the Dreams GPU worker link (/ws/gpu); unset: "
    "loopback workers only",
    "HF_TOKEN": "Hugging Face token for gated model repositories (read by huggingface_hub)",
}


class RestartPolicy(msgspec.Struct, forbid_unknown_fields=True):
    """Restart with exponential backoff; more than ``max_restarts`` within ``window_s``
    marks the service failed instead of restarting it forever."""

    max_restarts: int = 5
    window_s: float = 60.0
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 5.0


class ServiceConfig(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    kind: Kind
    options: dict[str, Any] = {}
    restart: RestartPolicy = msgspec.field(default_factory=RestartPolicy)


Z85Key = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")]


class NodesConfig(msgspec.Struct, forbid_unknown_fields=True):
    """A front's media nodes (``[nodes]``): where they join, and which keys may."""

    #: The front's CURVE secret key (``supervisor keygen``); nodes hold its public key.
    secret_key: Z85Key
    #: The ROUTER nodes dial (ZeroMQ TCP with CURVE).
    bind: str = "tcp://0.0.0.0:7700"
    #: Node name → its CURVE public key. A node with any other key is refused (and logged).
    allowed: dict[str, Z85Key] = {}
    #: A node heard from for no longer than this is lost: its sessions get ``stream_stopped``.
    timeout_s: float = 3.0


class NodeConfig(msgspec.Struct, forbid_unknown_fields=True):
    """This host as a media node of a front (``[node]``, read by ``supervisor node``)."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
    secret_key: Z85Key
    front_public_key: Z85Key
    #: The front's ROUTER (``supervisor node --join`` overrides it).
    join: str = ""
    #: A front heard from for no longer than this is gone: the node closes its sessions.
    timeout_s: float = 3.0


class Config(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    run_dir: str | None = None
    log_level: str = "INFO"
    heartbeat_interval_s: float = 0.5
    #: A process whose loop does not answer for this long is restarted (10 s: a loaded
    #: 2-core box can stall a healthy loop for a few seconds).
    heartbeat_timeout_s: float = 10.0
    #: Model processes answer heartbeats during their calls too (a thread of their own): one
    #: that does not for this long is frozen (SIGSTOP, a deadlock) and is restarted.
    model_heartbeat_timeout_s: float = 10.0
    #: A model call may run this many times its longest recent call (never less than
    #: stall_timeout_s) before it is taken for stuck and its process restarted.
    model_call_limit_factor: float = 4.0
    #: The first call has no history (it may compile, warm up a 14B model on a small GPU).
    model_first_call_timeout_s: float = 600.0
    #: decode and encode answer between frames (a few ms each): a frozen one is restarted
    #: after this long, so a viewer loses well under 3 s of video (restart and keyframe
    #: included). Media stages must not wait as long as a stage that runs a model.
    media_heartbeat_timeout_s: float = 1.5
    #: A stage with frames waiting that finishes none for this long is restarted.
    stall_timeout_s: float = 5.0
    ready_timeout_s: float = 60.0
    #: Loading a pipeline (weights, compilation) may take long on a real GPU box.
    load_timeout_s: float = 900.0
    stop_timeout_s: float = 3.0
    ring_slots: int = 4
    max_frame_width: int = 1920
    max_frame_height: int = 1080
    #: Pipelines whose inference process starts with the server (``inference/<id>``).
    pipelines: list[str] = []
    #: Several GPUs: one inference process per model pipeline per device
    #: (``inference/<id>@cuda:N``, started with ``CUDA_VISIBLE_DEVICES=N``); a new session goes
    #: to the device with the most free memory, then the fewest sessions. ``cpu:N`` names
    #: stand-ins (tests). Empty: one process per pipeline.
    devices: list[Annotated[str, msgspec.Meta(pattern=r"^(cuda|cpu):[0-9]{1,2}$")]] = []
    #: Where pipelines' model files live (``download_models`` fills it).
    models_dir: str | None = None
    #: The user's dreamwire directory (Scope's UI keeps its onboarding answers there).
    home: str | None = None
    #: decode and encode, the WebRTC media stages, and their options.
    media: bool = True
    decode: DecodeOptions = msgspec.field(default_factory=DecodeOptions)
    encode: EncodeOptions = msgspec.field(default_factory=EncodeOptions)
    #: The overlay's model: None is Moondream 2 from ``models_dir``; ``module:callable`` builds
    #: anything with Moondream's four methods (a plugin, or a test stand-in).
    overlay_model: str | None = None
    overlay_model_options: dict[str, Any] = {}
    #: Concurrent WebRTC sessions; the next offer gets 429.
    max_sessions: int = 8
    #: A session whose peer has not connected this long after its answer is closed, freeing
    #: its slot (an offer that never connects must not hold one).
    connect_timeout_s: float = 10.0
    #: Extra services, started in order before signalling (e.g. testsrc/testsink).
    services: list[ServiceConfig] = []
    #: Start the HTTP server (signalling).
    signalling: bool = True
    restart: RestartPolicy = msgspec.field(default_factory=RestartPolicy)
    #: The HTTP API: body limit, CORS origins, ICE servers (STUN, TURN, Twilio).
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    #: The Dreams broadcast: playback rate, cache, grace period, rate limits, the generator.
    dreams: DreamsConfig = msgspec.field(default_factory=DreamsConfig)
    #: Recordings of sessions' output: where, their limits, how long they are kept.
    recording: RecordingOptions = msgspec.field(default_factory=RecordingOptions)
    #: This server is a front with media nodes on other hosts: sessions are placed on them.
    nodes: NodesConfig | None = None
    #: This server is a media node of a front (``supervisor node``): no signalling, a link.
    node: NodeConfig | None = None

    @property
    def local_pipelines(self) -> bool:
        """Whether pipelines run here: not on a front whose media all live on its nodes."""
        return self.media or self.nodes is None


def default_run_base() -> Path:
    if env := os.environ.get("DREAMWIRE_RUN_DIR"):
        return Path(env)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "dreamwire"
    return Path.home() / ".dreamwire" / "run"


def default_home() -> Path:
    if env := os.environ.get("DREAMWIRE_HOME"):
        return Path(env).expanduser()
    return Path.home() / ".dreamwire"


def load_config(path: str | Path | None, **overrides: Any) -> Config:
    """Read a TOML file (optional), apply CLI overrides that are not None, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    if level := os.environ.get("DREAMWIRE_LOG_LEVEL"):
        data.setdefault("log_level", level)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return msgspec.convert(data, Config)
