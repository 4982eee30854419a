"""The containerd gRPC façade: `runv-py containerd` (daemon) and `runv-py ctr` (client).

api_pb2.py and api_pb2_grpc.py are generated from api.proto by gen.sh and committed, so
installing runv-py needs no protoc.
"""
