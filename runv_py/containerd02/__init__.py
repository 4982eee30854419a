"""`runv-py containerd`: a gRPC daemon in the shape of runV's containerd (containerd
0.2's ``types.API``), and `runv-py ctr`, its client. Containers live in per-sandbox
shims, reached through runv_py.shim.

api_pb2.py and api_pb2_grpc.py are generated from api.proto by gen.sh and committed, so
installing runv-py needs no protoc.
"""
