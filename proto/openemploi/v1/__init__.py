"""Generated gRPC/protobuf code for the openemploi API (see proto/openemploi/v1/*.proto)."""
