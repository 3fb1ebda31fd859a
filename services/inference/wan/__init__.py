"""Causal (autoregressive) Wan2.1 video pipelines: streamdiffusionv2, longlive, krea-realtime-video.

``specs`` is torch-free (the registry imports it); the other modules are the heavy half, loaded
only inside the inference process that runs one of these pipelines.
"""
