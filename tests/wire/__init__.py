"""Over gRPC against a real server on a free loopback port (in-process where a process adds nothing)."""
