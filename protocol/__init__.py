"""The wire format: codec, message types and ZeroMQ transport helpers (see SPEC.md)."""
