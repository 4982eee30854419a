"""A Kubernetes CRI test harness: a private containerd 1.6 with its CRI plugin enabled
(``CriContainerd``) and a typed gRPC client for the CRI v1 API (``CriClient``).

``api.proto`` is the subset of k8s.io/cri-api's runtime.v1 API the tests use;
``api_pb2.py`` and ``api_pb2_grpc.py`` are generated from it by ``gen.sh``.
"""
