// Widgets for schema fields: slider, toggle, select, text, number, list, and the prompt editor.
// Each `render…` answers {element, setDisabled(bool)} and reports edits through
// `onChange(value, delayMs)`: the delay is how long to wait for a newer value before sending.

import { stepFor, validate } from "./schema.js";

const DELAY_SLIDER_MS = 60;
const DELAY_TEXT_MS = 350;
const DELAY_NOW_MS = 0;

let uid = 0;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function formatNumber(value, step) {
  if (typeof value !== "number" || Number.isNaN(value)) return "";
  const decimals = step >= 1 ? 0 : Math.min(4, Math.ceil(-Math.log10(step)));
  return value.toFixed(decimals);
}

function fieldShell(field, control, { inline = false, extra = null } = {}) {
  const id = control.id || `f${++uid}`;
  control.id = id;
  const label = el("label", { class: "field-label", for: id, text: field.label });
  const head = el("div", { class: "field-head" }, label, extra);
  const wrap = el("div", {
    class: `field field-${field.widget}${inline ? " inline" : ""}`,
    "data-param": field.key,
  });
  if (field.description) wrap.title = field.description;
  wrap.append(head);
  if (inline) head.append(control);
  else wrap.append(control);
  const error = el("p", { class: "field-error", hidden: true });
  wrap.append(error);
  const showError = (text) => {
    error.textContent = text;
    error.hidden = !text;
    wrap.classList.toggle("invalid", Boolean(text));
  };
  return { wrap, showError };
}

export function renderField(field, value, onChange) {
  switch (field.widget) {
    case "slider":
      return renderSlider(field, value, onChange);
    case "number":
      return renderNumber(field, value, onChange);
    case "toggle":
      return renderToggle(field, value, onChange);
    case "select":
      return renderSelect(field, value, onChange);
    case "text":
      return renderText(field, value, onChange);
    case "list":
      return renderList(field, value, onChange);
    default:
      throw new Error(`no widget for ${field.key}`);
  }
}

function renderSlider(field, value, onChange) {
  const s = field.schema;
  const step = stepFor(s);
  const range = el("input", {
    type: "range",
    min: String(s.minimum),
    max: String(s.maximum),
    step: String(step),
    value: String(value),
    name: field.key,
  });
  const box = el("input", {
    type: "number",
    class: "slider-value",
    min: String(s.minimum),
    max: String(s.maximum),
    step: String(step),
    value: formatNumber(value, step),
    "aria-label": `${field.label} value`,
  });
  const { wrap, showError } = fieldShell(field, range, { extra: box });
  const paint = () => {
    const pct = ((Number(range.value) - s.minimum) / (s.maximum - s.minimum || 1)) * 100;
    range.style.setProperty("--fill", `${pct}%`);
  };
  paint();
  range.addEventListener("input", () => {
    const v = Number(range.value);
    box.value = formatNumber(v, step);
    paint();
    showError("");
    onChange(v, DELAY_SLIDER_MS);
  });
  box.addEventListener("change", () => {
    const v = Number(box.value);
    const err = validate(s, v, field.root);
    showError(err);
    if (err) return;
    range.value = String(v);
    paint();
    onChange(v, DELAY_NOW_MS);
  });
  return {
    element: wrap,
    setDisabled(d) {
      range.disabled = d;
      box.disabled = d;
    },
  };
}

function renderNumber(field, value, onChange) {
  const s = field.schema;
  const input = el("input", {
    type: "number",
    name: field.key,
    value: String(value ?? ""),
    step: s.multipleOf ? String(s.multipleOf) : s.type === "integer" ? "1" : "any",
    min: s.minimum !== undefined ? String(s.minimum) : undefined,
    max: s.maximum !== undefined ? String(s.maximum) : undefined,
  });
  let extra = null;
  if (s.type === "integer" && typeof s.maximum === "number") {
    extra = el("button", {
      type: "button",
      class: "icon-button small",
      title: "Random",
      "aria-label": `Random ${field.label}`,
      text: "⚄",
    });
    extra.addEventListener("click", () => {
      const lo = s.minimum ?? 0;
      input.value = String(lo + Math.floor(Math.random() * Math.min(s.maximum - lo + 1, 2 ** 31)));
      input.dispatchEvent(new Event("change"));
    });
  }
  const { wrap, showError } = fieldShell(field, input, { extra });
  input.addEventListener("change", () => {
    const v = Number(input.value);
    const err = validate(s, v, field.root);
    showError(err);
    if (!err) onChange(v, DELAY_NOW_MS);
  });
  return {
    element: wrap,
    setDisabled(d) {
      input.disabled = d;
      if (extra) extra.disabled = d;
    },
  };
}

function renderToggle(field, value, onChange) {
  const input = el("input", {
    type: "checkbox",
    role: "switch",
    class: "switch",
    name: field.key,
    checked: Boolean(value),
  });
  const { wrap } = fieldShell(field, input, { inline: true });
  input.addEventListener("change", () => onChange(input.checked, DELAY_NOW_MS));
  return {
    element: wrap,
    setDisabled(d) {
      input.disabled = d;
    },
  };
}

function renderSelect(field, value, onChange) {
  const select = el("select", { name: field.key });
  // A nullable enum (`X | None`) offers "None" first; it sends null.
  const options = field.schema.nullable ? [null, ...field.schema.enum] : field.schema.enum;
  for (const option of options) {
    select.append(
      el("option", {
        value: JSON.stringify(option),
        text: option === null ? "None" : String(option),
        selected: option === value,
      }),
    );
  }
  const { wrap } = fieldShell(field, select);
  select.addEventListener("change", () => onChange(JSON.parse(select.value), DELAY_NOW_MS));
  return {
    element: wrap,
    setDisabled(d) {
      select.disabled = d;
    },
  };
}

function renderText(field, value, onChange) {
  const input = el("input", { type: "text", name: field.key, maxlength: field.schema.maxLength });
  input.value = value ?? "";
  const { wrap } = fieldShell(field, input);
  input.addEventListener("input", () => onChange(input.value, DELAY_TEXT_MS));
  return {
    element: wrap,
    setDisabled(d) {
      input.disabled = d;
    },
  };
}

/** A list of numbers (or strings) as comma-separated text, e.g. denoising steps "700, 500". */
function renderList(field, value, onChange) {
  const s = field.schema;
  const item = s.items && s.items.type ? s.items : { type: "string" };
  const numeric = item.type === "integer" || item.type === "number";
  const input = el("input", {
    type: "text",
    name: field.key,
    inputmode: numeric ? "numeric" : undefined,
    value: (value || []).join(", "),
    spellcheck: false,
  });
  const { wrap, showError } = fieldShell(field, input);
  input.addEventListener("input", () => {
    const parts = input.value
      .split(/[,\s]+/)
      .map((p) => p.trim())
      .filter(Boolean);
    const list = numeric ? parts.map(Number) : parts;
    const err = validate(s, list, field.root);
    showError(err);
    if (!err) onChange(list, DELAY_TEXT_MS);
  });
  return {
    element: wrap,
    setDisabled(d) {
      input.disabled = d;
    },
  };
}

/**
 * The prompt editor: one row per prompt (text + weight), add/remove, and, when the pipeline
 * takes transitions, the number of frames a change of prompt is spread over.
 * `onChange({prompts, transitionSteps}, delayMs)`.
 */
export function renderPrompts(field, state, transition, onChange) {
  const s = field.schema;
  const root = field.root;
  const itemSchema = s.items.$ref ? resolveItem(s.items, root) : s.items;
  const weightSchema = (itemSchema.properties || {}).weight || {};
  const wMin = weightSchema.minimum ?? 0;
  const wMax = Math.max(wMin + 0.01, Math.min(weightSchema.maximum ?? 1, 1));
  const maxItems = s.maxItems ?? 8;
  const minItems = Math.max(1, s.minItems ?? 1);

  const wrap = el("div", { class: "field field-prompts", "data-param": field.key });
  const list = el("div", { class: "prompt-list" });
  const add = el("button", { type: "button", class: "button ghost small", text: "+ Add prompt" });
  wrap.append(list, add);
  let disabled = false;

  const emit = (delay) => onChange({ prompts: state.prompts, transitionSteps: state.transitionSteps }, delay);

  const draw = () => {
    list.replaceChildren();
    state.prompts.forEach((prompt, i) => {
      const text = el("textarea", {
        class: "prompt-text",
        rows: "2",
        placeholder: "Describe what you want to see…",
        "aria-label": `Prompt ${i + 1}`,
        name: `prompt-${i}`,
      });
      text.value = prompt.text;
      text.addEventListener("input", () => {
        prompt.text = text.value;
        emit(DELAY_TEXT_MS);
      });
      const row = el("div", { class: "prompt-row" }, text);
      if (state.prompts.length > 1) {
        const weight = el("input", {
          type: "range",
          min: String(wMin),
          max: String(wMax),
          step: "0.01",
          value: String(Math.min(prompt.weight, wMax)),
          "aria-label": `Weight of prompt ${i + 1}`,
        });
        const shown = el("span", { class: "weight-value mono", text: prompt.weight.toFixed(2) });
        const paint = () =>
          weight.style.setProperty("--fill", `${((prompt.weight - wMin) / (wMax - wMin)) * 100}%`);
        paint();
        weight.addEventListener("input", () => {
          prompt.weight = Number(weight.value);
          shown.textContent = prompt.weight.toFixed(2);
          paint();
          emit(DELAY_SLIDER_MS);
        });
        const remove = el("button", {
          type: "button",
          class: "icon-button small",
          "aria-label": `Remove prompt ${i + 1}`,
          title: "Remove",
          text: "×",
        });
        remove.disabled = state.prompts.length <= minItems;
        remove.addEventListener("click", () => {
          state.prompts.splice(i, 1);
          draw();
          emit(DELAY_NOW_MS);
        });
        row.append(el("div", { class: "prompt-weight" }, el("span", { class: "field-label", text: "weight" }), weight, shown, remove));
      }
      list.append(row);
    });
    add.disabled = disabled || state.prompts.length >= maxItems;
    for (const node of list.querySelectorAll("textarea, input, button")) {
      if (disabled) node.disabled = true;
    }
  };
  add.addEventListener("click", () => {
    state.prompts.push({ text: "", weight: wMax });
    draw();
    list.querySelector(".prompt-row:last-child textarea")?.focus();
  });
  draw();

  if (transition) {
    const stepsField = {
      key: "transition_steps",
      label: "Transition",
      widget: "slider",
      description: "Frames a change of prompt is spread over (0 = at once)",
      schema: {
        type: "integer",
        minimum: transition.minSteps,
        maximum: Math.min(transition.maxSteps, 64),
      },
      root,
    };
    const slider = renderSlider(stepsField, state.transitionSteps, (v) => {
      state.transitionSteps = v;
    });
    slider.element.classList.add("transition");
    wrap.append(slider.element);
    const base = slider.setDisabled;
    return {
      element: wrap,
      setDisabled(d) {
        disabled = d;
        draw();
        base(d);
      },
    };
  }
  return {
    element: wrap,
    setDisabled(d) {
      disabled = d;
      draw();
    },
  };
}

function resolveItem(ref, root) {
  return ref.$ref
    .slice(2)
    .split("/")
    .reduce((acc, part) => (acc ? acc[part] : undefined), root) || {};
}

export { el };
