"""The gRPC controller (installed as adaptrun.controller)."""
