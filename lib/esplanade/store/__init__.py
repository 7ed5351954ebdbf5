"""The state store: one contract, an etcd backend and an embedded SQLite backend."""
