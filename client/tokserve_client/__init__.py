"""tokserve's Python client: media in, numpy token arrays out, and back, over HTTP.

    with Client("http://127.0.0.1:8000") as tok:
        grids = tok.encode_images([open("photo.jpg", "rb").read()])  # [Encoded]
        grids[0].tokens                                                # [h, w] uint16
        png = tok.decode_image(grids[0])                               # PNG bytes

``AsyncClient`` makes the same calls awaited. Lists longer than the server's limits go as
several requests, ``max_concurrency`` at once; 503s and connection errors are retried after the
server's ``Retry-After``. When an item fails, the call raises ItemsFailed, which still holds
every other item's result. No torch: a training job installs this package alone.
"""

from tokserve_client.aio import AsyncClient
from tokserve_client.live import AudioStream, StreamClosed, SyncAudioStream
from tokserve_client.results import Encoded, ItemError, ItemsFailed, TokserveError
from tokserve_client.retry import RetryPolicy
from tokserve_client.streams import pack_streams, unpack_streams
from tokserve_client.sync import Client

__all__ = [
    "AsyncClient",
    "AudioStream",
    "Client",
    "Encoded",
    "ItemError",
    "ItemsFailed",
    "RetryPolicy",
    "StreamClosed",
    "SyncAudioStream",
    "TokserveError",
    "pack_streams",
    "unpack_streams",
]
