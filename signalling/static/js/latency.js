// The latency card: while a stream runs, GET /api/v1/metrics?session=<id> about once a second
// and draw where the session's milliseconds go — one stacked bar of the stage means in pipeline
// order (they add up to the end-to-end mean), a legend naming each stage with its mean, the
// slowest stage highlighted, and the end-to-end p50/p95 and the dropped frames beside the title.
//
// A 404 means the session is gone on the server (it stopped the stream, or the page closed
// it): the card says so and polling ends, without an alert. The page's stream handling hides
// the card when the stream ends.

import { api } from "./api.js";
import { el } from "./controls.js";

const POLL_INTERVAL_MS = 1000;
const LABEL_AIR_PX = 6; // around a label inside its segment

/** Milliseconds as the card prints them: one decimal below 100, whole above. */
export function formatMs(ms) {
  if (typeof ms !== "number" || !Number.isFinite(ms)) return "–";
  return ms < 100 ? ms.toFixed(1) : String(Math.round(ms));
}

/** What the card shows for one session of a MetricsReport (pure; tested in the browser). */
export function chartModel(session) {
  const stages = (session && session.stages) || [];
  const e2e = session && session.end_to_end;
  const drops = (session && session.drops) || {};
  const total = stages.reduce((sum, s) => sum + Math.max(0, s.latency.mean_ms), 0);
  let slowest = null;
  for (const s of stages) if (!slowest || s.latency.mean_ms > slowest.latency.mean_ms) slowest = s;
  const dropped = Object.values(drops).reduce((sum, n) => sum + n, 0);
  return {
    ready: Boolean(e2e && e2e.count > 0 && stages.length && total > 0),
    stages: stages.map((s) => ({
      stage: s.stage,
      process: s.process,
      kind: s.kind,
      meanMs: s.latency.mean_ms,
      p50Ms: s.latency.p50_ms,
      p95Ms: s.latency.p95_ms,
      fraction: total > 0 ? Math.max(0, s.latency.mean_ms) / total : 0,
      drops: drops[s.stage] || 0,
      slowest: s === slowest,
    })),
    slowest: slowest ? slowest.stage : null,
    p50Ms: e2e ? e2e.p50_ms : null,
    p95Ms: e2e ? e2e.p95_ms : null,
    meanMs: e2e ? e2e.mean_ms : null,
    frames: e2e ? e2e.count : 0,
    dropped,
    drops,
  };
}

/** The process a stage runs in, as the colour key ("inference/passthrough" → "inference"). */
function processKey(process) {
  return String(process || "").split("/", 1)[0];
}

export class LatencyChart {
  /**
   * @param {HTMLElement} root the card ([hidden] while no stream runs)
   * @param {{fetchMetrics?: (sessionId: string) => Promise<object>, intervalMs?: number}} options
   */
  constructor(root, { fetchMetrics = api.metrics, intervalMs = POLL_INTERVAL_MS } = {}) {
    this.root = root;
    this.fetchMetrics = fetchMetrics;
    this.intervalMs = intervalMs;
    this.sessionId = null;
    this.timer = null;
    this.generation = 0; // a poll of an older start() drops its answer
    this.polling = false;
    this.rows = new Map(); // stage -> {segment, label, item, value, badge}
    this.bar = root.querySelector(".latency-bar");
    this.legend = root.querySelector(".latency-legend");
    this.note = root.querySelector(".latency-note");
    this.p50 = root.querySelector("[data-latency='p50']");
    this.p95 = root.querySelector("[data-latency='p95']");
    this.dropped = root.querySelector("[data-latency='drops']");
    this.shown = []; // the stages on the bar now, for fitting labels when its width changes
    new ResizeObserver(() => this.fitLabels(this.shown)).observe(this.bar);
  }

  /** Show the card for a session and poll its metrics until stop(). */
  start(sessionId) {
    this.stop();
    this.sessionId = sessionId;
    this.polling = true;
    this.root.hidden = false;
    this.showNote("Waiting for frames…");
    this.poll(this.generation);
  }

  /** Stop polling and hide the card; safe to call twice. */
  stop() {
    this.generation += 1;
    clearTimeout(this.timer);
    this.timer = null;
    this.polling = false;
    this.sessionId = null;
    this.root.hidden = true;
    this.root.dataset.state = "";
    this.clear();
  }

  async poll(generation) {
    let report = null;
    try {
      report = await this.fetchMetrics(this.sessionId);
    } catch (err) {
      if (generation !== this.generation) return;
      if (err && err.status === 404) {
        // The session is gone on the server: nothing more to ask for.
        this.polling = false;
        this.root.dataset.state = "ended";
        this.showNote("The session has ended.");
        return;
      }
      this.root.dataset.state = "stale"; // keep the last numbers, dimmed, and try again
    }
    if (generation !== this.generation) return;
    if (report) {
      const session = (report.sessions || []).find((s) => s.session_id === this.sessionId);
      if (session) this.render(chartModel(session));
    }
    this.timer = setTimeout(() => this.poll(generation), this.intervalMs);
  }

  showNote(text) {
    this.note.textContent = text;
    this.note.hidden = !text;
  }

  clear() {
    this.shown = [];
    this.rows.clear();
    this.bar.replaceChildren();
    this.legend.replaceChildren();
    this.p50.textContent = this.p95.textContent = this.dropped.textContent = "–";
    this.dropped.parentElement.dataset.state = "";
    this.dropped.parentElement.title = "";
  }

  render(model) {
    this.root.dataset.state = "";
    this.p50.textContent = model.frames ? `${formatMs(model.p50Ms)} ms` : "–";
    this.p95.textContent = model.frames ? `${formatMs(model.p95Ms)} ms` : "–";
    this.dropped.textContent = String(model.dropped);
    this.dropped.parentElement.dataset.state = model.dropped ? "warn" : "";
    this.dropped.parentElement.title = Object.entries(model.drops)
      .filter(([, n]) => n)
      .map(([stage, n]) => `${stage}: ${n}`)
      .join(", ");
    if (!model.ready) {
      this.clear();
      this.showNote("Waiting for frames…");
      return;
    }
    this.showNote("");
    const names = model.stages.map((s) => s.stage).join(" ");
    if (names !== [...this.rows.keys()].join(" ")) this.build(model.stages);
    for (const s of model.stages) this.update(this.rows.get(s.stage), s);
    this.root.dataset.slowest = model.slowest || "";
    this.bar.setAttribute(
      "aria-label",
      `Mean ${formatMs(model.meanMs)} ms end to end; slowest stage ${model.slowest}`,
    );
    this.shown = model.stages;
    this.fitLabels(model.stages);
  }

  /** One segment and one legend entry per stage, in pipeline order. */
  build(stages) {
    this.rows.clear();
    this.bar.replaceChildren();
    this.legend.replaceChildren();
    for (const s of stages) {
      const attrs = { "data-stage": s.stage, "data-process": processKey(s.process), "data-kind": s.kind };
      const label = el("span", { class: "latency-seg-label" });
      const segment = el("div", { class: "latency-seg", ...attrs }, label);
      const value = el("span", { class: "latency-ms" });
      const badge = el("span", { class: "latency-drops", hidden: true });
      const item = el(
        "li",
        { class: "latency-item", ...attrs },
        el("span", { class: "latency-swatch", "aria-hidden": "true" }),
        el("span", { class: "latency-name", text: s.stage }),
        value,
        badge,
      );
      this.bar.append(segment);
      this.legend.append(item);
      this.rows.set(s.stage, { segment, label, item, value, badge });
    }
  }

  update(row, s) {
    const ms = formatMs(s.meanMs);
    row.segment.style.flexGrow = String(s.fraction);
    row.segment.classList.toggle("slowest", s.slowest);
    row.item.classList.toggle("slowest", s.slowest);
    row.label.textContent = `${s.stage} ${ms}`;
    row.value.textContent = ms;
    const detail =
      `${s.stage} (${s.process}, ${s.kind}): mean ${ms} ms, p50 ${formatMs(s.p50Ms)} ms, ` +
      `p95 ${formatMs(s.p95Ms)} ms, ${Math.round(s.fraction * 100)}% of the total`;
    row.segment.title = row.item.title = detail;
    row.badge.hidden = !s.drops;
    row.badge.textContent = s.drops ? `↓${s.drops}` : "";
    row.badge.title = s.drops ? `${s.drops} frames dropped here` : "";
  }

  /** A segment names its stage only where the name fits (the legend names them all). Widths
   * are worked out from the fractions, not measured: the segments may still be animating. */
  fitLabels(stages) {
    if (!stages.length) return;
    const style = getComputedStyle(this.bar);
    const gap = parseFloat(style.columnGap) || 0;
    const inner =
      this.bar.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight) -
      gap * Math.max(0, stages.length - 1);
    for (const s of stages) {
      const { segment, label } = this.rows.get(s.stage);
      segment.classList.toggle("tight", label.scrollWidth + LABEL_AIR_PX > s.fraction * inner);
    }
  }
}
