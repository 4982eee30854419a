#!/bin/sh
# Regenerate api_pb2.py and api_pb2_grpc.py from api.proto, a subset of the CRI v1 API
# (k8s.io/cri-api pkg/apis/runtime/v1/api.proto, same names and field numbers). The
# generated files are committed, so running the tests needs no protoc. Needs
# grpcio-tools (the `test` extra).
#
# protoc runs from tests/ so that the file registers in protobuf's default descriptor
# pool as "cri/api.proto": runv_py.containerd02 already registers an "api.proto", and
# one process (a pytest session) may import both.
set -e
cd "$(dirname "$0")/.."
python3 -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. cri/api.proto
# Generated code imports its sibling as `from cri import ...`: make it package-relative.
sed -i 's/^from cri import api_pb2 as/from . import api_pb2 as/' cri/api_pb2_grpc.py
