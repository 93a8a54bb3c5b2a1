"""gradserve.wire: what the server and the SDK both mean by the wire's names and numbers.

Derivative kinds and their options, the latency breakdown's hops, tensor bytes and float
types, status numbers. It imports nothing of the server or the SDK, so each can depend on it
without depending on the other; this package itself imports nothing, so that a module of it
that needs neither protobuf nor gRPC (`kinds`, `timing`) can be used where those are kept out.
"""
