#!/usr/bin/env python3
"""Regenerate the Python bindings of the runtime's own protobuf schema.

Usage (from anywhere; needs grpcio-tools, e.g. `pip install -e .[test]`):

    python proto/generate.py          # rewrite runtime/storage/records_pb2.py
    python proto/generate.py --check  # exit 1 if the committed file is stale, 0 if up to date

Input:  proto/macp_runtime/storage/v1/records.proto
Output: runtime/storage/records_pb2.py   (imported as `macp_runtime.storage.records_pb2`)

records.proto imports nothing, so the generated module has no `import ..._pb2` lines that would
need rewriting. The one thing adjusted after protoc is the module name protoc passes to the
builder (derived from the proto package, `macp_runtime.storage.v1.records_pb2`): it becomes the
real import path so the message classes' `__module__` (used by pickle and reprs) is correct.
The descriptor's file name stays `macp_runtime/storage/v1/records.proto`, unique in the pool.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

PROTO_REL = "macp_runtime/storage/v1/records.proto"
GENERATED_REL = "macp_runtime/storage/v1/records_pb2.py"
TARGET = os.path.join(REPO, "runtime", "storage", "records_pb2.py")

PROTOC_MODULE_NAME = "'macp_runtime.storage.v1.records_pb2'"
IMPORT_MODULE_NAME = "'macp_runtime.storage.records_pb2'"


def _include_dir() -> str:
    """The well-known-types include directory bundled with grpc_tools."""
    import grpc_tools  # imported lazily so `--help` works without grpcio-tools

    return os.path.join(os.path.dirname(os.path.abspath(grpc_tools.__file__)), "_proto")


def generate(out_dir: str) -> str:
    """Run protoc into out_dir and return the (post-processed) generated source."""
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{HERE}",
        f"-I{_include_dir()}",
        f"--python_out={out_dir}",
        os.path.join(HERE, PROTO_REL),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"protoc failed ({proc.returncode}):\n{proc.stderr}")
    with open(os.path.join(out_dir, GENERATED_REL), encoding="utf-8") as f:
        source = f.read()
    if PROTOC_MODULE_NAME not in source:
        raise SystemExit(f"generated code does not name {PROTOC_MODULE_NAME}; check generate.py")
    source = source.replace(PROTOC_MODULE_NAME, IMPORT_MODULE_NAME)
    # Guard: an import of another generated module would break under the installed name.
    for line in source.splitlines():
        if line.startswith(("import ", "from ")) and "_pb2" in line:
            raise SystemExit(f"generated code imports another module, needs rewriting: {line}")
    return source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and exit 1 if the committed file differs",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="macp-protogen-") as tmp:
        source = generate(tmp)

    if args.check:
        try:
            with open(TARGET, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != source:
            print(f"{os.path.relpath(TARGET, REPO)} is stale: run python proto/generate.py", file=sys.stderr)
            return 1
        print(f"{os.path.relpath(TARGET, REPO)} is up to date")
        return 0

    tmp_target = TARGET + ".tmp"
    with open(tmp_target, "w", encoding="utf-8") as f:
        f.write(source)
    os.replace(tmp_target, TARGET)
    print(f"wrote {os.path.relpath(TARGET, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
