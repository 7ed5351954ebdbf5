"""Process lifecycle: one service per process (`service_host`), or all four (`supervisor`)."""
