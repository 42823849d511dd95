"""The gRPC transport (grpc.aio): admission, conversion, the status table, the handlers and the
server. The only package of the runtime that imports grpc on the serving side."""
