"""The engine in-process (no gRPC): judging, lifecycle, checkpoints, receipts."""
