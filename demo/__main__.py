"""`make demo`: two sites keyed by hand over the Dataplane gRPC API (IKE will replace the manual keys)."""

from demo.manual_sites import main

raise SystemExit(main())
