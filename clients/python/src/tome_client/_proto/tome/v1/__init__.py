"""tome.v1 from proto/tome/v1/tome.proto: messages (tome_pb2) and service stubs (tome_pb2_grpc)."""
