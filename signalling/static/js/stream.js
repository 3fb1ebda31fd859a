// One WebRTC session with the server, as Scope's guides do it: data channel "parameters",
// the camera track (or a receive-only transceiver for text-to-video), the offer with the
// initial parameters, trickled ICE candidates (PATCH), and DELETE on close.
//
// Events (EventTarget): "track" {stream}, "message" {data}, "state" {state},
// "stats" {fps, width, height, rttMs}, "ended" {reason, error} (once; not after close()).

import { api } from "./api.js";

const CHANNEL = "parameters";
const STATS_INTERVAL_MS = 1000;
const PING_INTERVAL_MS = 1000;

export class Stream extends EventTarget {
  constructor({ inputStream = null, initialParameters = {} } = {}) {
    super();
    this.inputStream = inputStream;
    this.initialParameters = initialParameters;
    this.pc = null;
    this.channel = null;
    this.sessionId = null;
    this.closed = false;
    this.timers = [];
    this.queuedCandidates = [];
    this.lastFrames = null;
    this.rttMs = null;
  }

  async open() {
    const { iceServers } = await api.iceServers();
    if (this.closed) return;
    const pc = new RTCPeerConnection({ iceServers: iceServers || [] });
    this.pc = pc;

    const channel = pc.createDataChannel(CHANNEL, { ordered: true });
    this.channel = channel;
    channel.onopen = () => this.emit("channelopen", {});
    channel.onmessage = (event) => this.onMessage(event.data);

    if (this.inputStream) {
      for (const track of this.inputStream.getVideoTracks()) {
        pc.addTrack(track, this.inputStream);
        track.addEventListener("ended", () => this.end("the input video ended", true));
      }
    } else {
      pc.addTransceiver("video", { direction: "recvonly" });
    }

    pc.ontrack = (event) => {
      const stream = event.streams && event.streams[0] ? event.streams[0] : new MediaStream([event.track]);
      this.emit("track", { stream });
    };
    pc.onconnectionstatechange = () => {
      this.emit("state", { state: pc.connectionState });
      if (pc.connectionState === "failed") this.end("the connection to the server failed", true);
      if (pc.connectionState === "closed") this.end("the connection was closed", true);
    };
    pc.onicecandidate = (event) => {
      if (!event.candidate) return;
      const c = {
        candidate: event.candidate.candidate,
        sdpMid: event.candidate.sdpMid,
        sdpMLineIndex: event.candidate.sdpMLineIndex,
      };
      if (this.sessionId) this.sendCandidates([c]);
      else this.queuedCandidates.push(c);
    };

    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    const answer = await api.offer(pc.localDescription.sdp, pc.localDescription.type, this.initialParameters);
    if (this.closed) {
      api.close(answer.sessionId).catch(() => {});
      return;
    }
    this.sessionId = answer.sessionId;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    if (this.queuedCandidates.length) {
      this.sendCandidates(this.queuedCandidates.splice(0));
    }
    this.timers.push(setInterval(() => this.pollStats(), STATS_INTERVAL_MS));
    this.timers.push(setInterval(() => this.ping(), PING_INTERVAL_MS));
  }

  sendCandidates(candidates) {
    api.candidates(this.sessionId, candidates).catch((err) => {
      if (!this.closed) console.warn("ICE candidates refused:", err.message);
    });
  }

  onMessage(raw) {
    let data;
    try {
      data = JSON.parse(raw);
    } catch {
      return;
    }
    if (data && data.type === "pong") {
      if (typeof data.data === "number") this.rttMs = performance.now() - data.data;
      return;
    }
    this.emit("message", { data });
    if (data && data.type === "stream_stopped") {
      this.end(data.error_message || "the server stopped the stream", Boolean(data.error_message), true);
    }
  }

  /** Send a parameter patch; false when the channel is not open (the caller keeps it). */
  send(params) {
    if (!this.channel || this.channel.readyState !== "open") return false;
    this.channel.send(JSON.stringify(params));
    return true;
  }

  get channelOpen() {
    return Boolean(this.channel && this.channel.readyState === "open");
  }

  ping() {
    if (this.channelOpen) this.channel.send(JSON.stringify({ type: "ping", data: performance.now() }));
  }

  async pollStats() {
    if (!this.pc || this.closed) return;
    let report;
    try {
      report = await this.pc.getStats();
    } catch {
      return;
    }
    let inbound = null;
    let pairRtt = null;
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") inbound = s;
      if (s.type === "candidate-pair" && s.nominated && typeof s.currentRoundTripTime === "number") {
        pairRtt = s.currentRoundTripTime * 1000;
      }
    });
    let fps = null;
    if (inbound) {
      const now = performance.now();
      const frames = inbound.framesDecoded ?? 0;
      if (this.lastFrames) {
        const dt = (now - this.lastFrames.t) / 1000;
        if (dt > 0) fps = (frames - this.lastFrames.n) / dt;
      }
      this.lastFrames = { t: now, n: frames };
      if (fps === null && typeof inbound.framesPerSecond === "number") fps = inbound.framesPerSecond;
    }
    this.emit("stats", {
      fps,
      width: inbound ? inbound.frameWidth : null,
      height: inbound ? inbound.frameHeight : null,
      rttMs: this.rttMs ?? pairRtt,
    });
  }

  /** The session ended without close(): `error` says whether it was a failure. */
  end(reason, error, fromServer = false) {
    if (this.closed || this.ended) return;
    this.ended = true;
    this.emit("ended", { reason, error, fromServer });
  }

  /** Close everything; safe to call twice. */
  async close({ tellServer = true } = {}) {
    if (this.closed) return;
    this.closed = true;
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    const sessionId = this.sessionId;
    if (this.channel) this.channel.onmessage = null;
    if (this.pc) {
      this.pc.onconnectionstatechange = null;
      this.pc.ontrack = null;
      this.pc.onicecandidate = null;
      this.pc.close();
    }
    if (sessionId && tellServer) {
      try {
        await api.close(sessionId);
      } catch {
        // Already gone on the server (it stopped the stream): nothing to do.
      }
    }
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/** Delays of the reconnect: 1 s, 2 s, 4 s … at most 30 s; reset() after a stable stream. */
export class Backoff {
  constructor(initialMs = 1000, maxMs = 30000) {
    this.initialMs = initialMs;
    this.maxMs = maxMs;
    this.attempt = 0;
  }

  next() {
    const delay = Math.min(this.maxMs, this.initialMs * 2 ** this.attempt);
    this.attempt += 1;
    return delay;
  }

  reset() {
    this.attempt = 0;
  }
}
