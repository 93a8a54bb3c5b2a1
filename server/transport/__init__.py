"""gRPC plumbing shared by every protocol: routing calls, admission before reading, large
tensor bytes past protobuf, status codes, answering unary calls and streams.
"""
