// Parameter changes on their way to the server over the data channel: merged (the newest value
// of each key wins), sent once the edits pause for a moment, and at least every MAX_WAIT_MS
// while a slider is being dragged.

const MAX_WAIT_MS = 150;

export class ParamQueue {
  /** `send(patch)` answers false when it cannot send yet (the patch is kept for `flush()`). */
  constructor(send) {
    this.send = send;
    this.pending = {};
    this.since = 0;
    this.timer = null;
  }

  queue(patch, delayMs) {
    // A transition replaces a pending plain prompt change, and the other way round.
    if ("transition" in patch) delete this.pending.prompts;
    if ("prompts" in patch) delete this.pending.transition;
    Object.assign(this.pending, patch);
    const now = performance.now();
    if (!this.since) this.since = now;
    const wait = Math.max(0, Math.min(delayMs, this.since + MAX_WAIT_MS - now));
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.flush(), wait);
  }

  flush() {
    clearTimeout(this.timer);
    this.timer = null;
    if (!Object.keys(this.pending).length) return;
    if (this.send(this.pending)) this.clear();
  }

  clear() {
    clearTimeout(this.timer);
    this.timer = null;
    this.pending = {};
    this.since = 0;
  }
}
