"""Scope's HTTP API for the signalling process: types, backend protocol, routes, ICE, CORS,
OpenAPI. Socket-free with respect to the rest of dreamwire: everything goes through an
``ApiBackend``."""

from signalling.api.backend import ApiBackend
from signalling.api.config import ApiConfig
from signalling.api.routes import API_STATE, ApiState, add_api_routes, create_api_app
from signalling.api.state import StudioState

__all__ = [
    "API_STATE",
    "ApiBackend",
    "ApiConfig",
    "ApiState",
    "StudioState",
    "add_api_routes",
    "create_api_app",
]
