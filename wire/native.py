"""The native protocol's numbers for the derivative kinds: its `Derivative` enum names them as
`gradserve.wire.kinds` does, so the mapping is derived from the generated enum, not written.
"""

from __future__ import annotations

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.kinds import Derivative

NUMBER = {kind: pb.Derivative.Value(kind.name) for kind in Derivative}
KIND = {number: kind for kind, number in NUMBER.items()}
