#!/bin/sh
# Regenerate the Python modules of containerd's API from the .proto files next to this script.
#
# Needs grpcio-tools (pip install -e '.[dev]'). The generated modules check at import time that
# the installed protobuf and grpcio are at least the versions that generated them: after
# regenerating, raise the protobuf and grpcio lower bounds in pyproject.toml to the versions
# this script prints.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../../.." && pwd)  # the directory holding the crifs package
cd "$src"
# -I src makes the modules import each other as crifs.containerd.api.<name>_pb2.
python3 -m grpc_tools.protoc -I "$src" --python_out="$src" --pyi_out="$src" \
    --grpc_python_out="$src" crifs/containerd/api/*.proto
# The versions the modules now require (pyproject.toml's lower bounds must not be lower):
echo "protobuf >= $(sed -n 's/^# Protobuf Python Version: //p' "$here/version_pb2.py")"
echo "grpcio >= $(sed -n "s/^GRPC_GENERATED_VERSION = '\(.*\)'/\1/p" "$here/version_pb2_grpc.py")"
