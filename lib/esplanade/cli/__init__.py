"""The `esplanade` command: run the platform (`up`, `serve`), manage keys, and `ctl` it."""
