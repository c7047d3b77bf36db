"""gRPC servicers: validate, translate proto <-> domain types, map errors to status codes."""
