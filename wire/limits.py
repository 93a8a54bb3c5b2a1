"""Sizes both sides assume of a message unless told otherwise. Plain Python."""

MIB = 2**20
MAX_MESSAGE_MB = 64  # the largest request or answer message (the server's --max-message-mb)
