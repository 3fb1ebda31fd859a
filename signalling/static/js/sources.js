// Input sources: a camera (by device id), a local video file played in a loop, or none.

/** The cameras the browser knows; labels appear once camera permission was given. */
export async function listCameras() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return [];
  const devices = await navigator.mediaDevices.enumerateDevices();
  return devices
    .filter((d) => d.kind === "videoinput")
    .map((d, i) => ({ id: d.deviceId, label: d.label || `Camera ${i + 1}` }));
}

export async function openCamera(deviceId, width, height) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("this browser gives no camera access here (the page needs https or localhost)");
  }
  const video = { width: { ideal: width }, height: { ideal: height } };
  if (deviceId) video.deviceId = { exact: deviceId };
  try {
    return await navigator.mediaDevices.getUserMedia({ video, audio: false });
  } catch (err) {
    const why = {
      NotAllowedError: "camera permission was refused",
      NotFoundError: "no camera was found",
      NotReadableError: "the camera is in use by another program",
      OverconstrainedError: "the chosen camera is not available",
    }[err.name];
    throw new Error(why || `the camera could not be opened (${err.message})`);
  }
}

/** Play `file` in `videoElement` (looped, muted) and answer the element's captured stream. */
export async function openFile(file, videoElement) {
  if (!file) throw new Error("choose a video file first");
  const capture = videoElement.captureStream || videoElement.mozCaptureStream;
  if (!capture) throw new Error("this browser cannot stream a video file");
  if (videoElement.dataset.objectUrl) URL.revokeObjectURL(videoElement.dataset.objectUrl);
  videoElement.srcObject = null;
  const url = URL.createObjectURL(file);
  videoElement.dataset.objectUrl = url;
  videoElement.src = url;
  videoElement.loop = true;
  videoElement.muted = true;
  try {
    await videoElement.play();
  } catch (err) {
    throw new Error(`the file cannot be played (${err.message})`);
  }
  const stream = capture.call(videoElement);
  if (!stream.getVideoTracks().length) {
    await new Promise((resolve) => stream.addEventListener("addtrack", resolve, { once: true }));
  }
  return stream;
}

export function stopStream(stream) {
  if (!stream) return;
  for (const track of stream.getTracks()) track.stop();
}

const SOURCE_HINTS = {
  both: "This pipeline transforms your video, or generates from the prompt alone.",
  video: "This pipeline transforms your video.",
  text: "This pipeline generates video from the prompt: no input needed.",
};

/** The Source card: camera / video file / none, the camera list, and the input preview. */
export class InputPanel {
  constructor(ui, onChange) {
    // ui: {sourceGroup, cameraField, cameraSelect, fileField, fileInput, sourceHint, preview}
    this.ui = ui;
    this.source = "camera";
    ui.sourceGroup.addEventListener("change", (event) => {
      this.setSource(event.target.value);
      onChange();
    });
    ui.cameraSelect.addEventListener("change", onChange);
    ui.fileInput.addEventListener("change", onChange);
    navigator.mediaDevices?.addEventListener?.("devicechange", () => this.refreshCameras());
  }

  /** Offer the sources a pipeline's modes ("video", "text") allow. */
  setModes(modes) {
    const video = modes.includes("video");
    const text = modes.includes("text");
    for (const radio of this.ui.sourceGroup.querySelectorAll("input")) {
      const ok = radio.value === "none" ? text : video;
      radio.disabled = !ok;
      radio.parentElement.classList.toggle("unavailable", !ok);
    }
    const current = this.ui.sourceGroup.querySelector(`input[value="${this.source}"]`);
    const usable = current.disabled ? this.ui.sourceGroup.querySelector("input:not(:disabled)") : current;
    if (usable) this.setSource(usable.value);
    this.ui.sourceHint.textContent = SOURCE_HINTS[video && text ? "both" : video ? "video" : "text"];
  }

  setSource(source) {
    this.source = source;
    this.ui.sourceGroup.querySelector(`input[value="${source}"]`).checked = true;
    this.ui.cameraField.hidden = source !== "camera";
    this.ui.fileField.hidden = source !== "file";
  }

  async refreshCameras() {
    let cameras;
    try {
      cameras = await listCameras();
    } catch {
      return;
    }
    const select = this.ui.cameraSelect;
    const chosen = select.value;
    const options = [new Option("Default camera", "")];
    for (const cam of cameras) if (cam.id) options.push(new Option(cam.label, cam.id));
    select.replaceChildren(...options);
    if (options.some((o) => o.value === chosen)) select.value = chosen;
  }

  /** The chosen input as a MediaStream, or null for "none". */
  async open(width, height) {
    if (this.source === "none") return null;
    if (this.source === "file") return openFile(this.ui.fileInput.files[0], this.ui.preview);
    const stream = await openCamera(this.ui.cameraSelect.value, width, height);
    this.refreshCameras(); // labels are known once permission is given
    return stream;
  }

  showPreview(stream) {
    const preview = this.ui.preview;
    if (stream && this.source === "camera") {
      preview.removeAttribute("src");
      preview.srcObject = stream;
    }
    preview.hidden = !stream;
  }

  /** Stop the input's tracks and empty the preview. */
  close(stream) {
    stopStream(stream);
    const preview = this.ui.preview;
    preview.srcObject = null;
    if (preview.dataset.objectUrl) {
      URL.revokeObjectURL(preview.dataset.objectUrl);
      delete preview.dataset.objectUrl;
    }
    preview.removeAttribute("src");
    preview.load();
    preview.hidden = true;
  }
}
