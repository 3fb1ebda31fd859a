// The Scope HTTP API, as used by the page. Every call answers parsed JSON or throws ApiError
// with the server's own words (`detail` of an error body) as its message.

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.body = body;
  }
}

async function call(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, `server unreachable (${err.message})`, null);
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!response.ok) {
    throw new ApiError(response.status, errorText(response.status, data), data);
  }
  return data;
}

function errorText(status, data) {
  if (data && typeof data === "object") {
    if (data.meta && data.meta.error === "concurrency_limit_reached") {
      return `the server is busy: ${data.meta.limit} streams already running`;
    }
    if (typeof data.detail === "string") return data.detail;
    if (typeof data.error === "string") return data.error;
  }
  if (typeof data === "string" && data) return data;
  return `HTTP ${status}`;
}

export const api = {
  schemas: () => call("GET", "/api/v1/pipelines/schemas"),
  status: () => call("GET", "/api/v1/pipeline/status"),
  load: (pipelineId, loadParams) =>
    call("POST", "/api/v1/pipeline/load", { pipeline_id: pipelineId, load_params: loadParams }),
  modelsStatus: (pipelineId) =>
    call("GET", `/api/v1/models/status?pipeline_id=${encodeURIComponent(pipelineId)}`),
  download: (pipelineId) => call("POST", "/api/v1/models/download", { pipeline_id: pipelineId }),
  iceServers: () => call("GET", "/api/v1/webrtc/ice-servers"),
  offer: (sdp, type, initialParameters) =>
    call("POST", "/api/v1/webrtc/offer", { sdp, type, initialParameters }),
  candidates: (sessionId, candidates) =>
    call("PATCH", `/api/v1/webrtc/offer/${encodeURIComponent(sessionId)}`, { candidates }),
  close: (sessionId) => call("DELETE", `/api/v1/webrtc/offer/${encodeURIComponent(sessionId)}`),
  metrics: (sessionId) => call("GET", `/api/v1/metrics?session=${encodeURIComponent(sessionId)}`),
};

/** Download progress in any of the shapes a server may send: a fraction, a percentage, or an
 * object with `percentage`/`progress`, `current_file`, `state`, `error`. */
export function readProgress(progress) {
  const out = { percent: null, file: "", state: "", error: "" };
  if (progress == null) return out;
  if (typeof progress === "number") {
    out.percent = progress <= 1 ? progress * 100 : progress;
    return out;
  }
  if (typeof progress === "object") {
    const pct = progress.percentage ?? progress.percent ?? progress.progress;
    if (typeof pct === "number") out.percent = pct <= 1 && progress.percentage == null ? pct * 100 : pct;
    out.file = progress.current_file || progress.file || "";
    out.state = progress.state || "";
    out.error = progress.error || "";
  }
  return out;
}
