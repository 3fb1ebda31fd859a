"""Dreams' generator side: the worker that makes a dream's frames and pushes them to a hub.

* :mod:`dreams.wire`: the ``/ws/gpu`` protocol and the saved state, shared with the hub
  (``signalling.dreams``), which imports nothing else from here;
* :mod:`dreams.generators`: the generator contract and the built-in ``testcard``;
* :mod:`dreams.pipeline`: ``pipeline:<id>``, one of dreamwire's text-mode pipelines;
* :mod:`dreams.worker`: the worker process (``python -m dreams.worker``, ``supervisor worker``).
"""
