"""`--frontends N`: the supervisor, the engine process, a frontend's remote engines, the
shared memory sub-batches cross in, and one /metrics gathered from every process.
"""
