#!/usr/bin/env python3
"""A FastRTC passthrough server for ``bench_e2e.py``, written as FastRTC's docs write one.

``Stream(handler, modality="video", mode="send-receive")`` mounted on a FastAPI app (with a
``concurrency_limit`` above FastRTC's default of one connection), and the
app's input hook (``POST /input_hook``), as in FastRTC's examples: FastRTC calls a video handler
only once its input is set, so without the hook frames would pass untouched and the handler
would never run. The handler returns the frame it is given (FastRTC hands it over as a BGR
numpy array and encodes what comes back).

It needs FastRTC (``pip install fastrtc``, which brings gradio): run it with a Python that has
it (``bench_e2e.py --fastrtc-python PATH``); dreamwire does not depend on it.

    python scripts/fastrtc_server.py --port 8200
"""

from __future__ import annotations

import argparse

import numpy as np
import uvicorn
from fastapi import FastAPI
from fastrtc import Stream
from pydantic import BaseModel


def passthrough(frame: np.ndarray, _setting: object = None) -> np.ndarray:
    return frame


class InputData(BaseModel):
    webrtc_id: str


def create_app(sessions: int) -> FastAPI:
    stream = Stream(
        handler=passthrough, modality="video", mode="send-receive", concurrency_limit=sessions
    )
    app = FastAPI()
    stream.mount(app)

    @app.post("/input_hook")
    async def input_hook(body: InputData) -> dict[str, str]:
        stream.set_input(body.webrtc_id, "on")
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--sessions", type=int, default=8, help="FastRTC's concurrency_limit")
    args = parser.parse_args()
    uvicorn.run(create_app(args.sessions), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
