"""Model files: where they live, what a pipeline needs, downloading them from the hub."""
