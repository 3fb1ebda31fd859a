"""``download_models --pipeline <id>``: fetch a pipeline's model files.

Also what ``POST /api/v1/models/download`` runs (as ``python -m services.models.cli ...
--quiet``); progress goes to ``<models_dir>/.progress/<id>.json`` either way.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from services.inference import registry
from services.models.downloads import DownloadError, download
from services.models.store import MODELS_DIR_ENV, resolve_models_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="download_models", description="Download the model files a pipeline needs."
    )
    parser.add_argument("--pipeline", required=True, help="pipeline id, e.g. streamdiffusion")
    parser.add_argument(
        "--models-dir",
        default=None,
        help=f"where models live (default ${MODELS_DIR_ENV} or ~/.dreamwire/models)",
    )
    parser.add_argument("--token", default=None, help="hub token (default $HF_TOKEN)")
    parser.add_argument("--endpoint", default=None, help="hub URL (default $HF_ENDPOINT)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s [download_models] %(message)s",
    )
    if not registry.is_known(args.pipeline):
        known = ", ".join(sorted(registry.specs()))
        print(
            f"download_models: unknown pipeline {args.pipeline!r} (known: {known})", file=sys.stderr
        )
        return 2
    models_dir = resolve_models_dir(args.models_dir)
    try:
        download(
            args.pipeline,
            models_dir,
            token=args.token or os.environ.get("HF_TOKEN"),
            endpoint=args.endpoint,
            show_bar=not args.quiet,
        )
    except DownloadError as exc:
        print(f"download_models: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("download_models: interrupted; run it again to resume", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"models for {args.pipeline} are in {models_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
