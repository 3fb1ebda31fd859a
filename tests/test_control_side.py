"""The service side of the control protocol (``services.control.ControlSide``), shared by every
service process and signalling: what it says, what it refuses and how refusals are counted."""

from __future__ import annotations

import os

import pytest

from services import protocol as p
from services.control import ControlSide, Progress

pytestmark = pytest.mark.timeout(10)


def test_hello_ready_and_acks_carry_what_the_supervisor_checks() -> None:
    side = ControlSide("encode", "s3cret")
    supervisor = p.supervisor_control_codec()
    assert supervisor.decode(side.hello()) == p.Hello("encode", os.getpid(), "s3cret")
    assert supervisor.decode(side.ready()) == p.Ready("encode")
    ack = supervisor.decode(side.ack(7, Progress(frames_done=3, sessions=2)))
    assert ack == p.HeartbeatAck(7, frames_done=3, frames_waiting=0, rejected=0, sessions=2)


def test_refusals_of_every_kind_are_counted_once_and_reported() -> None:
    side = ControlSide("encode", "")
    assert side.decode(b"\xc1 not msgpack") is None
    assert side.decode(p.supervisor_control_codec().encode(p.Heartbeat(1))) == p.Heartbeat(1)
    side.reject("WorkerExited: encode does not take it")
    side.reject("inbox message: truncated")
    ack = p.supervisor_control_codec().decode(side.ack(2, Progress()))
    assert isinstance(ack, p.HeartbeatAck) and ack.rejected == 3
