"""fedsqueeze.v1: generated protobuf and gRPC code for the wire protocol (see fedsqueeze.proto)."""
