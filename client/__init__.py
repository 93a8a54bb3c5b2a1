"""gradserve client SDK: y and dy/dx from a gradserve server, blocking or asyncio.

from gradserve.client import GradientClient
with GradientClient("127.0.0.1:50051") as client:
    r = client.evaluate([0.2, 0.6])
    print(r.y, r.dy_dx)
"""

from gradserve.client.aio import AsyncGradientClient
from gradserve.client.channel import Tls
from gradserve.client.errors import GradserveError
from gradserve.client.results import ModelInfo, ModelVersion, Result, Timing
from gradserve.client.retry import RetryPolicy
from gradserve.client.sync import GradientClient

__all__ = [
    "AsyncGradientClient",
    "GradientClient",
    "GradserveError",
    "ModelInfo",
    "ModelVersion",
    "Result",
    "RetryPolicy",
    "Timing",
    "Tls",
]
