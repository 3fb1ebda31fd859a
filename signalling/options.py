"""What the signalling service is started with: one typed Struct, filled by the supervisor from
its config tree (``supervisor.plan``), where every default is written. No defaults here for
what the config decides: a missing key is a start-up error naming it."""

from __future__ import annotations

import msgspec

from services.options import RecordingOptions
from signalling.api import ApiConfig
from signalling.dreams.config import DreamsConfig


class SignallingOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str
    port: int
    max_sessions: int
    connect_timeout_s: float
    #: None: ``services.models.store.default_models_dir()``.
    models_dir: str | None = None
    #: The web UI's stored answers (``~/.dreamwire``); None: nowhere (tests).
    home: str | None = None
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    dreams: DreamsConfig = msgspec.field(default_factory=DreamsConfig)
    recording: RecordingOptions = msgspec.field(default_factory=RecordingOptions)
