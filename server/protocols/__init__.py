"""One module per protocol: its codec (messages <-> tickets and results) and its calls that
are not model requests (health, metadata).
"""
