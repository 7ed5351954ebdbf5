"""The dataplane service: ESP/AH engines, the userspace and kernel backends, and its gRPC face."""
