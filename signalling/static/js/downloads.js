// The models box of the pipeline card: whether the selected pipeline's models are on disk, a
// Download button (POST /api/v1/models/download) and a progress bar polled from
// GET /api/v1/models/status while the download runs.

import { api, readProgress } from "./api.js";

const POLL_MS = 1000;
const FINISHED = new Set(["done", "error", "interrupted"]);

export class ModelsPanel {
  constructor(ui, onError) {
    this.ui = ui; // {models, modelsText, download, downloadProgress, downloadBar, downloadDetail}
    this.onError = onError;
    this.pipelineId = null;
    this.started = false; // a download this page asked for, until it finishes
    this.timer = null;
    ui.download.addEventListener("click", () => this.download());
  }

  /** Show the box for a pipeline (hidden when it needs no models). */
  show(pipelineId, pipeline) {
    clearTimeout(this.timer);
    this.pipelineId = pipelineId;
    this.started = false;
    this.ui.models.hidden = true;
    if (pipeline && pipeline.requires_models) this.refresh();
  }

  async refresh() {
    const id = this.pipelineId;
    clearTimeout(this.timer);
    let status;
    try {
      status = await api.modelsStatus(id);
    } catch (err) {
      if (id !== this.pipelineId) return;
      this.ui.models.hidden = false;
      this.ui.models.dataset.state = "error";
      this.ui.modelsText.textContent = `Model status unknown: ${err.message}`;
      return;
    }
    if (id !== this.pipelineId) return;
    const progress = readProgress(status.progress);
    if (status.downloaded || FINISHED.has(progress.state)) this.started = false;
    const running = !status.downloaded && (this.started || progress.state === "downloading");
    this.render(status.downloaded, progress, running);
    if (running) this.timer = setTimeout(() => this.refresh(), POLL_MS);
  }

  render(downloaded, progress, running) {
    const ui = this.ui;
    ui.models.hidden = downloaded;
    if (downloaded) return;
    const failed = progress.state === "error" || progress.state === "interrupted" || Boolean(progress.error);
    ui.download.hidden = running;
    ui.download.textContent = failed ? "Retry download" : "Download";
    ui.downloadProgress.hidden = !running;
    ui.downloadProgress.classList.toggle("indeterminate", progress.percent === null);
    ui.downloadBar.style.width = `${Math.max(0, Math.min(100, progress.percent ?? 0))}%`;
    ui.models.dataset.state = running ? "downloading" : failed ? "error" : "missing";
    ui.modelsText.textContent = running
      ? "Downloading models…"
      : progress.state === "interrupted"
        ? "The download was interrupted."
        : failed
          ? `Download failed: ${progress.error || "unknown error"}`
          : "This pipeline's models are not downloaded yet.";
    const pct = progress.percent === null ? "" : `${Math.floor(progress.percent)}%`;
    ui.downloadDetail.textContent = running ? [pct, progress.file].filter(Boolean).join(" · ") : "";
    ui.downloadDetail.hidden = !ui.downloadDetail.textContent;
  }

  async download() {
    const id = this.pipelineId;
    try {
      await api.download(id);
    } catch (err) {
      // 409: a download of these models already runs; follow its progress.
      if (err.status !== 409) {
        this.onError(`The download of ${id}'s models did not start: ${err.message}`);
        return;
      }
    }
    if (id !== this.pipelineId) return;
    this.started = true;
    this.render(false, readProgress(null), true);
    this.timer = setTimeout(() => this.refresh(), POLL_MS);
  }
}
