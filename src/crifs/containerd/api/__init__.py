"""containerd's gRPC API, the part crifs calls: ``*.proto`` written for crifs with
containerd's package names and field numbers, and the modules ``generate.sh`` makes from them
with grpcio-tools (``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``; do not edit those).

Only :mod:`crifs.containerd.client` imports them, and only when it talks to a daemon, so
nothing else in crifs loads grpc or protobuf.
"""
