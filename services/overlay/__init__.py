"""The ``overlay`` service: Moondream 2 annotating video without ever holding it up.

Modules, lightest first:

* :mod:`services.overlay.config` — the ``moondream`` config (msgspec), its JSON Schema with UI
  hints; no torch, transformers or Pillow (the pipeline registry imports it);
* :mod:`services.overlay.model` — the model's Hugging Face artifacts, loading it with
  transformers from the models directory, calling one feature on one frame;
* :mod:`services.overlay.draw` — captions, Q&A bars, boxes and points drawn as the reference
  plugin draws them, laid out once per result and blended per frame;
* :mod:`services.overlay.runner` — the background thread the model runs on;
* :mod:`services.overlay.core` — :class:`~services.overlay.core.OverlayCore`, the ring stage.
"""
