"""The server's core: what a request is, how it is validated, queued, batched, explained and
bounded. Plain Python and numpy: no gRPC, no protobuf, no TensorFlow (checked by `make lint`).
"""
