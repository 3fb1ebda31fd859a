"""Dreams broadcast: one generated stream for many viewers (``../shared/reference/dreams-api.md``).

Mount with ``add_dreams_routes(app, DreamsConfig(...))``; frames come from a worker on
``/ws/gpu`` (``supervisor worker --connect URL``) or, in local mode, from
``hub.publish_frame(webp, frame_number, keyframe_number, generation_time_ms)``.
"""

from signalling.dreams.config import AUTH_TOKEN_ENV, DreamsConfig, LauncherConfig
from signalling.dreams.hub import DreamsHub
from signalling.dreams.launcher import ExternalWorker, Launcher, LocalWorkerLauncher
from signalling.dreams.routes import DREAMS, add_dreams_routes, close_dreams

__all__ = [
    "AUTH_TOKEN_ENV",
    "DREAMS",
    "DreamsConfig",
    "DreamsHub",
    "ExternalWorker",
    "Launcher",
    "LauncherConfig",
    "LocalWorkerLauncher",
    "add_dreams_routes",
    "close_dreams",
]
