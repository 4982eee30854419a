#!/bin/sh
# Regenerate api_pb2.py and api_pb2_grpc.py from api.proto (they are committed, so that
# installing runv-py needs no protoc). Needs grpcio-tools.
set -e
cd "$(dirname "$0")"
python3 -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. api.proto
# Generated code imports its sibling as a top-level module: make it package-relative.
sed -i 's/^import api_pb2 as api__pb2/from . import api_pb2 as api__pb2/' api_pb2_grpc.py
