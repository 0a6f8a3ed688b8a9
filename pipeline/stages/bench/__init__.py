"""bench: the timing protocol, the worker process per target, the per-image loop over real
files and the server scenario."""
