"""Generated gRPC stubs of the esplanade.v1 contracts (proto/esplanade/v1). Do not edit."""
