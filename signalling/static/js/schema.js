// From a pipeline's config JSON Schema (with `ui` hints per property) to the list of fields the
// page renders. Nothing here knows a pipeline by name: a new pipeline's settings show up as long
// as its schema says what they are.
//
// Rendered: every property with a `ui` hint (unless `ui.hidden`), a prompt list, and the
// pipeline's load-time parameters (`load_params`, or `ui.is_load_param`). Properties without either (internal
// switches such as `reset_cache`) are not shown, as in Scope's own frontend.

const CATEGORY_TITLES = { input: "Controls", configuration: "Settings" };
const SLIDER_MAX_SPAN = 100000; // wider integer ranges get a number box, not a slider

export function categoryTitle(category) {
  return CATEGORY_TITLES[category] || humanize(category);
}

export function humanize(key) {
  const words = String(key).replace(/[_-]+/g, " ").trim();
  return words.charAt(0).toUpperCase() + words.slice(1);
}

/** Follow `$ref` (local `#/$defs/...`) and collapse `anyOf: [X, null]` to X. */
export function resolve(schema, root) {
  let node = schema || {};
  for (let depth = 0; depth < 8; depth++) {
    if (node.$ref && node.$ref.startsWith("#/")) {
      const target = node.$ref
        .slice(2)
        .split("/")
        .reduce((acc, part) => (acc ? acc[part] : undefined), root);
      const { $ref, ...rest } = node;
      node = { ...(target || {}), ...rest };
      continue;
    }
    const union = node.anyOf || node.oneOf;
    if (Array.isArray(union)) {
      const options = union.filter((s) => s && s.type !== "null");
      if (options.length === 1) {
        const { anyOf, oneOf, ...rest } = node;
        node = { ...options[0], ...rest, nullable: true };
        continue;
      }
    }
    break;
  }
  return node;
}

function typeOf(s) {
  if (Array.isArray(s.type)) return s.type.find((t) => t !== "null");
  return s.type;
}

function isPromptList(s, root) {
  if (typeOf(s) !== "array" || !s.items) return false;
  const item = resolve(s.items, root);
  const props = item.properties || {};
  return "text" in props && "weight" in props;
}

/** The widget for one resolved property schema, or null when there is none. */
export function widgetFor(key, s, root) {
  if (isPromptList(s, root)) return "prompts";
  if (Array.isArray(s.enum)) return "select";
  if (s.const !== undefined) return null;
  const type = typeOf(s);
  if (type === "boolean") return "toggle";
  if (type === "integer" || type === "number") {
    const bounded = typeof s.minimum === "number" && typeof s.maximum === "number";
    if (bounded && !(type === "integer" && s.maximum - s.minimum > SLIDER_MAX_SPAN)) {
      return "slider";
    }
    return "number";
  }
  if (type === "string") return "text";
  if (type === "array" && s.items) {
    const item = resolve(s.items, root);
    const itemType = typeOf(item);
    if (itemType === "integer" || itemType === "number" || itemType === "string") return "list";
  }
  return null;
}

/** Slider step: the schema's multipleOf, 1 for integers, else a round hundredth of the span. */
export function stepFor(s) {
  if (typeof s.multipleOf === "number") return s.multipleOf;
  if (typeOf(s) === "integer") return 1;
  const span = s.maximum - s.minimum;
  if (!(span > 0)) return 0.01;
  const raw = span / 100;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  return magnitude;
}

/** Where a prompt list goes when its schema has no `ui` hint. */
const PROMPTS_UI = Object.freeze({ order: 1, category: "input", label: "Prompts" });

/**
 * Fields of one pipeline entry of `/api/v1/pipelines/schemas`, sorted by `ui.order`.
 * Each: {key, label, description, schema, widget, category, order, load, default, root}.
 */
export function fieldsOf(pipeline) {
  const root = pipeline.config_schema || {};
  const props = root.properties || {};
  const loadKeys = new Set(pipeline.load_params || []);
  const fields = [];
  let index = 0;
  for (const [key, raw] of Object.entries(props)) {
    index += 1;
    const schema = resolve(raw, root);
    // Prompts carry no `ui` hint (Scope's UI draws them itself): known by their shape.
    const prompts = !raw.ui && isPromptList(schema, root);
    const ui = raw.ui || (prompts ? PROMPTS_UI : {});
    const load = loadKeys.has(key) || ui.is_load_param === true;
    if (ui.hidden || (!raw.ui && !prompts && !load)) continue;
    const widget = widgetFor(key, schema, root);
    if (!widget) continue;
    fields.push({
      key,
      label: ui.label || schema.title || humanize(key),
      description: raw.description || schema.description || "",
      schema,
      widget,
      category: ui.category || "configuration",
      order: typeof ui.order === "number" ? ui.order : 1000 + index,
      load,
      default: defaultOf(schema, widget, root),
      root,
    });
  }
  fields.sort((a, b) => a.order - b.order || a.key.localeCompare(b.key));
  return fields;
}

function defaultOf(s, widget, root) {
  if (s.default !== undefined && s.default !== null) return structuredClone(s.default);
  // An optional setting that is off by default (Krea's fp8 `quantization`) stays off.
  if (s.default === null && s.nullable) return null;
  switch (widget) {
    case "toggle":
      return false;
    case "slider":
    case "number":
      return s.minimum ?? 0;
    case "select":
      return s.enum[0];
    case "text":
      return "";
    case "prompts":
      return [{ text: "", weight: resolve(s.items, root).properties.weight.default ?? 1 }];
    case "list":
      return [];
    default:
      return null;
  }
}

/** Group runtime fields by category, in first-seen (that is, ui.order) order. */
export function groupByCategory(fields) {
  const groups = new Map();
  for (const field of fields) {
    if (!groups.has(field.category)) groups.set(field.category, []);
    groups.get(field.category).push(field);
  }
  return groups;
}

/** The transition settings a schema offers, or null: {maxSteps, defaultSteps}. */
export function transitionOf(pipeline) {
  const root = pipeline.config_schema || {};
  const raw = (root.properties || {}).transition;
  if (!raw) return null;
  const t = resolve(raw, root);
  const steps = resolve((t.properties || {}).num_steps || {}, root);
  return {
    minSteps: steps.minimum ?? 0,
    maxSteps: steps.maximum ?? 64,
    defaultSteps: steps.default ?? 8,
    methods: resolve((t.properties || {}).temporal_interpolation_method || {}, root).enum || [
      "linear",
      "slerp",
    ],
  };
}

/** Check a value against a resolved schema; answers an error text or "". */
export function validate(s, value, root) {
  const type = typeOf(s);
  if (type === "integer" || type === "number") {
    if (typeof value !== "number" || Number.isNaN(value)) return "a number is needed";
    if (type === "integer" && !Number.isInteger(value)) return "a whole number is needed";
    if (typeof s.minimum === "number" && value < s.minimum) return `at least ${s.minimum}`;
    if (typeof s.maximum === "number" && value > s.maximum) return `at most ${s.maximum}`;
    if (typeof s.multipleOf === "number" && Math.abs(value / s.multipleOf - Math.round(value / s.multipleOf)) > 1e-9) {
      return `a multiple of ${s.multipleOf}`;
    }
    return "";
  }
  if (type === "array") {
    if (!Array.isArray(value)) return "a list is needed";
    if (typeof s.minItems === "number" && value.length < s.minItems) return `at least ${s.minItems} item(s)`;
    if (typeof s.maxItems === "number" && value.length > s.maxItems) return `at most ${s.maxItems} items`;
    const item = resolve(s.items || {}, root);
    for (const v of value) {
      const err = validate(item, v, root);
      if (err) return err;
    }
    return "";
  }
  return "";
}
