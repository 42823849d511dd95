"""Kernel: the session engine and its services (auth and access rules, checkpoints, receipts, what-if replay,
metrics). Knows no transport: nothing here imports gRPC."""
