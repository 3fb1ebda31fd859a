// The output card: the latest `fetch_output` message of the data channel as data — Moondream's
// caption or answer as text, its boxes and points counted and listed with their labels (numbered
// as the overlay numbers them), or any other pipeline's extra output as key/value text.
// Hidden until a result arrives, and again when the stream ends.
//
// Moondream sends {"feature", "frame", "result"} (services/overlay/core.py); a pipeline's own
// output is {"frame_number", ...info} (services/inference/core.py).

import { el } from "./controls.js";

const percent = (v) => `${Math.round(Number(v) * 100)}%`;

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

function plainText(d) {
  for (const key of ["text", "caption", "answer"]) if (typeof d[key] === "string") return d[key];
  return Object.entries(d)
    .filter(([k]) => k !== "frame_number")
    .map(([k, v]) => `${k.replace(/_/g, " ")} ${typeof v === "object" ? JSON.stringify(v) : v}`)
    .join(" · ");
}

/** {feature, frame, question, text, items[]} for a fetch_output's data (pure; tested). */
export function describeOutput(data) {
  const out = { feature: "", frame: null, question: "", text: "", items: [] };
  if (data === null || data === undefined) return out;
  if (typeof data !== "object") return { ...out, text: String(data) };
  const frame = data.frame ?? data.frame_number;
  out.frame = typeof frame === "number" ? frame : null;
  const r = data.result;
  if (typeof data.feature !== "string" || !r || typeof r !== "object") {
    return { ...out, text: plainText(data) };
  }
  out.feature = data.feature;
  const label = r.object || "object";
  switch (data.feature) {
    case "caption":
      out.text = String(r.caption ?? "");
      break;
    case "query":
      out.question = String(r.question ?? "");
      out.text = String(r.answer ?? "");
      break;
    case "detect": {
      const boxes = Array.isArray(r.objects) ? r.objects : [];
      out.text = `${plural(boxes.length, "box", "boxes")} · ${label}`;
      out.items = boxes.map((b, i) => ({
        n: i + 1,
        label,
        where: `${percent(b.x_min)}–${percent(b.x_max)} × ${percent(b.y_min)}–${percent(b.y_max)}`,
      }));
      break;
    }
    case "point": {
      const points = Array.isArray(r.points) ? r.points : [];
      out.text = `${plural(points.length, "point", "points")} · ${label}`;
      out.items = points.map((p, i) => ({ n: i + 1, label, where: `${percent(p.x)}, ${percent(p.y)}` }));
      break;
    }
    default:
      out.text = plainText(r);
  }
  return out;
}

export class OutputPanel {
  /** @param {HTMLElement} root the card, with .output-* children */
  constructor(root) {
    this.root = root;
    this.feature = root.querySelector(".output-feature");
    this.frame = root.querySelector(".output-frame");
    this.question = root.querySelector(".output-question");
    this.text = root.querySelector(".output-text");
    this.items = root.querySelector(".output-items");
  }

  show(data) {
    const d = describeOutput(data);
    if (!d.text && !d.items.length) {
      this.clear();
      return;
    }
    this.root.dataset.feature = d.feature;
    this.feature.textContent = d.feature ? ` · ${d.feature}` : "";
    this.frame.textContent = d.frame === null ? "" : `frame ${d.frame}`;
    this.question.textContent = d.question;
    this.question.hidden = !d.question;
    this.text.textContent = d.text;
    this.items.replaceChildren(
      ...d.items.map((item) =>
        el(
          "li",
          { class: "output-item" },
          el("span", { class: "output-n", text: String(item.n) }),
          el("span", { class: "output-label", text: item.label }),
          el("span", { class: "output-where", text: item.where }),
        ),
      ),
    );
    this.items.hidden = !d.items.length;
    this.root.hidden = false;
  }

  clear() {
    this.root.hidden = true;
    this.items.replaceChildren();
    this.text.textContent = "";
  }
}
