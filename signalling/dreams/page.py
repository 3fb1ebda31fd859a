"""The ``/dreams`` viewer page (``?embed=1``: the stream alone, no header or footer)."""

from __future__ import annotations

__all__ = ["render_page"]

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Dreams · dreamwire</title>
<style>
  html, body { margin: 0; background: #07070c; color: #d8d8e8;
               font: 15px/1.4 system-ui, sans-serif; }
  header, footer { padding: 12px 20px; }
  header h1 { margin: 0; font-size: 20px; font-weight: 600; letter-spacing: .02em; }
  main { display: flex; justify-content: center; }
  .embed main { height: 100vh; align-items: center; }
  canvas { width: 100%; max-width: 1024px; aspect-ratio: 2 / 1; background: #000;
           display: block; }
  .embed canvas { max-width: none; height: 100%; width: auto; }
  #status { color: #8a8aa8; }
  footer { font-size: 13px; color: #6a6a88; }
</style>
</head>
<body class="__MODE__">
__HEADER__
<main><canvas id="dream-canvas" width="1024" height="512"></canvas></main>
__FOOTER__
<script>
(() => {
  const canvas = document.getElementById('dream-canvas');
  const ctx = canvas.getContext('2d');
  const statusEl = document.getElementById('status');
  const fpsEl = document.getElementById('fps');
  const show = (text) => { if (statusEl) statusEl.textContent = text; };
  const queue = [];          // client-side frame queue: smooth display at the target fps
  let targetFps = 5, delay = 1000, frames = 0, lastCount = performance.now();
  function connect() {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${proto}//${location.host}/ws/dreams`);
    ws.binaryType = 'arraybuffer';
    let ping;
    ws.onopen = () => {
      delay = 1000;
      ping = setInterval(() => {
        if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({type: 'ping'}));
      }, 30000);
    };
    ws.onmessage = (event) => {
      if (event.data instanceof ArrayBuffer) {
        const view = new Uint8Array(event.data);
        if (view[0] === 0x01) {
          queue.push(new Blob([event.data.slice(1)], {type: 'image/webp'}));
          while (queue.length > 3 * targetFps) queue.shift();
        }
        return;
      }
      const msg = JSON.parse(event.data);
      if (msg.type === 'status') show(`${msg.message} · ${msg.viewer_count} watching`);
      else if (msg.type === 'config') targetFps = msg.target_fps;
    };
    ws.onclose = () => {
      clearInterval(ping);
      show(`Disconnected; retrying in ${Math.round(delay / 1000)} s`);
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    };
  }
  async function draw() {
    const blob = queue.shift();
    if (blob) {
      const img = await createImageBitmap(blob);
      canvas.width = img.width; canvas.height = img.height;
      ctx.drawImage(img, 0, 0);
      img.close();
      frames += 1;
    }
    const now = performance.now();
    if (fpsEl && now - lastCount >= 2000) {
      fpsEl.textContent = `${(frames * 1000 / (now - lastCount)).toFixed(1)} fps`;
      frames = 0; lastCount = now;
    }
    setTimeout(draw, 1000 / targetFps);
  }
  connect();
  draw();
})();
</script>
</body>
</html>
"""

_HEADER = '<header><h1>Dreams</h1><span id="status">Connecting…</span></header>'
_FOOTER = (
    '<footer><span id="fps"></span> · a live AI-generated stream · '
    '<a href="/api/dreams/embed" style="color:inherit">embed</a></footer>'
)


def render_page(embed: bool) -> str:
    return (
        _PAGE.replace("__MODE__", "embed" if embed else "full")
        .replace("__HEADER__", "" if embed else _HEADER)
        .replace("__FOOTER__", "" if embed else _FOOTER)
    )
