"""Images from closures: deterministic tar (``tar``), compression (``compress``), the
content-addressed layer cache (``layer_cache``), parallel layer builds (``layers``),
image config and customisation layer (``config``), manifests (``manifest``) and the
pipeline that ties them together (``compose``). ``model`` holds the shared vocabulary."""
