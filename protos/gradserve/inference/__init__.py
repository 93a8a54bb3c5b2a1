"""Generated code for the standard inference protocol (KServe v2 + Triton extensions).

Its messages live in a private descriptor pool (`grpc_service_pb2.POOL`), so this package
and tritonclient, which registers the same `inference.*` names, can share a process.
"""
