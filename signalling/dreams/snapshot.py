"""The last state snapshot of the worker, kept in a file across restarts of the server."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

__all__ = ["load_snapshot", "write_snapshot"]

logger = logging.getLogger(__name__)


def load_snapshot(path: str) -> bytes | None:
    """The snapshot saved at ``path``; None when there is none or it is not msgpack."""
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
        msgspec.msgpack.decode(data)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as exc:
        logger.warning("ignoring saved state %s: %s", path, exc)
        return None
    logger.info("loaded saved state from %s", path)
    return data


def write_snapshot(path: str, data: bytes) -> None:
    """Replace the file atomically (blocking: run it in a thread)."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
