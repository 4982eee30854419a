#!/bin/sh
# Regenerate ttrpc_pb2.py and shimv2_pb2.py (committed, so installing runv-py needs no
# protoc). Needs grpcio-tools.
set -e
cd "$(dirname "$0")"
python3 -m grpc_tools.protoc -I. --python_out=. shimv2.proto
