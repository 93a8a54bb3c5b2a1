"""The data plane every protocol shares, free of any transport: a decoded request (a ticket)
is queued as its caller's with its deadline, and its answer or failure is accounted once
(metrics, statistics, trace), whether it came over gRPC, a gRPC stream or REST.
"""
