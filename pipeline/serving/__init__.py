"""Serving: the Triton model repository, ``serve`` (Triton through PyTriton) and the
size-bounded HTTP and gRPC fronts before it."""
