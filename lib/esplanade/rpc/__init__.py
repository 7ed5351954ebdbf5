"""gRPC plumbing every service shares: server and channel set-up, interceptors, health."""
