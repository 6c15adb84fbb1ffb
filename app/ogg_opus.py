"""Ogg Opus (RFC 7845) read as it arrives (encode streams) and written as it is decoded
(decode streams), page by page.

Reading: pages are parsed by hand (a 27-byte header, a segment table, the segments; a packet
ends at a segment shorter than 255 bytes and may span pages), each page's CRC checked, and
each packet decoded by libopus through PyAV's codec context, at 48 kHz (FFmpeg's libopus
decoder always decodes at 48 kHz; it drops the OpusHead's pre-skip itself). Samples are
released only up to the last page's granule position, which trims the end as a file's reader
does (RFC 7845, 4.4 and 4.5).

Writing: libopus (PyAV) encodes at the model's rate where Opus takes it as it is (8, 12, 16,
24, 48 kHz: no resampler, so nothing held back but the encoder's 20 ms frame and 6.5 ms
lookahead); pages are written by hand, whole packets only, each write's packets on one page.
"""

from __future__ import annotations

import random
import struct
import zlib

import av
import numpy as np

from app.streaming import StreamRefused

OPUS_RATE = 48000  # of the decoded samples, the granule positions and the pre-skip
# capture, version, type, granule, serial, sequence, CRC, segments
_PAGE = struct.Struct("<4sBBqIIIB")
_HEAD = struct.Struct("<8sBBHIhB")  # "OpusHead", version, channels, pre-skip, rate, gain, family
_NO_GRANULE = -1  # a page on which no packet ends
_MAX_PACKET_BYTES = 1 << 16  # an Opus packet is at most 120 ms: a few KiB
_MAX_HELD = 2 * OPUS_RATE  # decoded samples a page's granule position may leave unreleased
_FRAME_MS = (10, 20, 40, 60) * 3 + (10, 20) * 2 + (2.5, 5, 10, 20) * 4  # by TOC config
_CRC_AT = 22  # the CRC's offset in a page header
_BOS, _EOS = 0x02, 0x04  # header type flags: first page, last page
_MAX_LACING = 255  # segments a page can hold
OPUS_INPUT_RATES = (8000, 12000, 16000, 24000, 48000)  # libopus encodes these as they are
# bit/s per channel: the default (Opus suggests 28 to 40 kbit/s for fullband speech) and the
# range accepted, within libopus' own
BITRATE_PER_CHANNEL = 32000
MIN_BITRATE_PER_CHANNEL, MAX_BITRATE_PER_CHANNEL = 6000, 256000
_VENDOR = b"tokserve (libopus via PyAV)"
_BIT_REVERSED = bytes(int(f"{byte:08b}"[::-1], 2) for byte in range(256))


def ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32 of ``data``: polynomial 0x04C11DB7, most significant bit first, initial 0,
    no final xor. zlib has the same polynomial bit-reflected: run over bit-reversed bytes from
    0 and without its final xor, its result bit-reversed is Ogg's, at C speed."""
    reflected = zlib.crc32(data.translate(_BIT_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


def ogg_page(packets: list[bytes], granule: int, serial: int, sequence: int, flags: int) -> bytes:
    """One Ogg page holding whole ``packets`` (at most 255 segments in all), CRC set."""
    lacing = bytearray()
    for packet in packets:
        lacing += b"\xff" * (len(packet) // 255) + bytes([len(packet) % 255])
    header = _PAGE.pack(b"OggS", 0, flags, granule, serial, sequence, 0, len(lacing))
    page = bytearray(header + lacing + b"".join(packets))
    struct.pack_into("<I", page, _CRC_AT, ogg_crc(bytes(page)))
    return bytes(page)


def _not_opus(detail: str) -> StreamRefused:
    return StreamRefused(
        4415,
        "Not Ogg Opus",
        f"{detail}; encoding=ogg_opus takes the bytes of an Ogg Opus file (RFC 7845), in order.",
    )


def packet_samples(packet: bytes) -> int:
    """An Opus packet's duration in 48 kHz samples, from its TOC byte (RFC 6716, 3.1)."""
    if not packet:
        return 0
    toc = packet[0]
    per_frame = int(_FRAME_MS[toc >> 3] * 48)
    count = toc & 3
    frames = 1 if count == 0 else 2 if count < 3 else (packet[1] & 0x3F if len(packet) > 1 else 0)
    return per_frame * frames


class OggOpusReader:
    """Bytes of one Ogg Opus stream in, in any chunks; samples [T, channels] float32 at 48 kHz
    out as soon as they are decoded and known to be the stream's."""

    def __init__(self) -> None:
        self.channels = 0  # known once OpusHead is read
        self._buffer = bytearray()
        self._packet = bytearray()
        self._serial: int | None = None
        self._headers = 0  # OpusHead and OpusTags read
        self._pre_skip = 0
        self._context: av.AudioCodecContext | None = None
        self._held: list[np.ndarray] = []  # decoded, beyond the last granule so far
        self._decoded = 0  # samples decoded (after pre-skip)
        self._released = 0
        self._limit = 0  # samples the last granule position says the stream holds
        self._start: int | None = None  # the first audio page's starting granule
        self._page_samples = 0  # 48 kHz samples of the packets ended on the current page

    def feed(self, data: bytes) -> np.ndarray:
        """Take the next bytes; the samples they complete (possibly none)."""
        self._buffer += data
        while len(self._buffer) >= _PAGE.size:
            header = _PAGE.unpack_from(self._buffer)
            capture, version, _, granule, serial, sequence, crc, segments = header
            if capture != b"OggS" or version != 0:
                raise _not_opus("The bytes are not an Ogg page (no 'OggS' version 0 header)")
            lacing_end = _PAGE.size + segments
            if len(self._buffer) < lacing_end:
                break
            lacing = self._buffer[_PAGE.size : lacing_end]
            end = lacing_end + sum(lacing)
            if len(self._buffer) < end:
                break
            page = bytes(self._buffer[:end])
            if ogg_crc(page[:_CRC_AT] + bytes(4) + page[_CRC_AT + 4 :]) != crc:
                raise StreamRefused(
                    4415,
                    "Corrupt Ogg page",
                    f"Ogg page {sequence} (its sequence number) fails its CRC check: its bytes "
                    "changed on the way. encoding=ogg_opus takes an Ogg Opus file's bytes "
                    "unchanged, in order.",
                )
            if self._serial is None:
                self._serial = serial
            elif serial != self._serial:
                raise _not_opus("The Ogg stream holds a second logical stream (a chained file)")
            self._page(page[lacing_end:], bytes(lacing), granule)
            del self._buffer[:end]
        return self._release()

    def _page(self, body: bytes, lacing: bytes, granule: int) -> None:
        """One page's segments into packets; the packets that end here decoded."""
        offset = 0
        self._page_samples = 0
        for size in lacing:
            self._packet += body[offset : offset + size]
            offset += size
            if len(self._packet) > _MAX_PACKET_BYTES:
                raise _not_opus(f"A packet runs past {_MAX_PACKET_BYTES} bytes")
            if size < 255:
                self._take(bytes(self._packet))
                self._packet.clear()
        if granule != _NO_GRANULE and self._headers == 2 and self._page_samples:
            if self._start is None:
                self._start = max(granule - self._page_samples, 0)
            self._limit = granule - self._start - self._pre_skip

    def _take(self, packet: bytes) -> None:
        if self._headers == 0:
            self._head(packet)
        elif self._headers == 1:
            if not packet.startswith(b"OpusTags"):
                raise _not_opus("The second packet is not OpusTags")
            self._headers = 2
        else:
            assert self._context is not None
            self._page_samples += packet_samples(packet)
            for frame in self._context.decode(av.Packet(packet)):
                samples = frame.to_ndarray().reshape(-1, self.channels)
                self._held.append(samples)
                self._decoded += len(samples)

    def _head(self, packet: bytes) -> None:
        """OpusHead: channels and pre-skip; the decoder opened."""
        if len(packet) < _HEAD.size or not packet.startswith(b"OpusHead"):
            raise _not_opus("The first packet is not OpusHead")
        _, version, channels, pre_skip, _, _, family = _HEAD.unpack_from(packet)
        if version >> 4:
            raise _not_opus(f"OpusHead version {version} is not 0.x")
        if family != 0 or not 1 <= channels <= 2:
            raise StreamRefused(
                4422,
                "Opus channels",
                f"The Opus stream has {channels} channels in mapping family {family}; mono or "
                "stereo (family 0) is accepted.",
            )
        self.channels = channels
        self._pre_skip = pre_skip
        context = av.CodecContext.create("libopus", "r")
        assert isinstance(context, av.AudioCodecContext)
        context.sample_rate = OPUS_RATE
        context.layout = "stereo" if channels == 2 else "mono"
        context.extradata = packet
        context.options = {"request_sample_fmt": "flt"}  # packed float: [T * channels]
        self._context = context
        self._headers = 1

    def _release(self) -> np.ndarray:
        """The held samples up to the last granule seen."""
        upto = min(self._decoded, self._limit)
        if self._decoded - max(upto, self._released) > _MAX_HELD:
            raise _not_opus("Its granule positions fall more than 2 s behind its packets")
        count = upto - self._released
        if count <= 0 or not self._held:
            return np.zeros((0, max(self.channels, 1)), np.float32)
        held = np.concatenate(self._held) if len(self._held) > 1 else self._held[0]
        out, rest = held[:count], held[count:]
        self._held = [rest] if len(rest) else []
        self._released = upto
        return np.ascontiguousarray(out, dtype=np.float32)


class OggOpusWriter:
    """Samples [T, C] float32 at the model's rate in, in any chunks; the bytes of one Ogg Opus
    stream out, in whole pages: ``headers()``, then ``write()`` per chunk, then ``finish()``."""

    def __init__(self, sample_rate: int, channels: int, bitrate: int) -> None:
        context = av.CodecContext.create("libopus", "w")
        assert isinstance(context, av.AudioCodecContext)
        # another rate is resampled to 48 kHz by PyAV's encoder (libswresample)
        context.sample_rate = sample_rate if sample_rate in OPUS_INPUT_RATES else OPUS_RATE
        context.layout = "stereo" if channels == 2 else "mono"
        context.format = "flt"  # packed float: [1, T * channels]
        context.bit_rate = bitrate
        context.open()
        self.sample_rate = sample_rate
        self.channels = channels
        self.pre_skip: int = struct.unpack_from("<H", bytes(context.extradata or b""), 10)[0]
        self._context = context
        self._serial = random.getrandbits(32)
        self._sequence = 0
        self._granule = 0  # 48 kHz samples of the packets paged so far, pre-skip included
        self._samples = 0  # written, at sample_rate

    def headers(self) -> bytes:
        """OpusHead on the first page (BOS), OpusTags on the second."""
        head = _HEAD.pack(b"OpusHead", 1, self.channels, self.pre_skip, self.sample_rate, 0, 0)
        tags = b"OpusTags" + struct.pack("<I", len(_VENDOR)) + _VENDOR + struct.pack("<I", 0)
        return self._page([head], 0, _BOS) + self._page([tags], 0, 0)

    def write(self, samples: np.ndarray) -> bytes:
        """The pages of the packets that ``samples`` [T, C] complete (often b"": an Opus frame
        is 20 ms, and the encoder holds its 6.5 ms lookahead)."""
        if not len(samples):
            return b""
        self._samples += len(samples)
        return self._pages(self._context.encode(self._frame(samples)), end=None)

    def finish(self) -> bytes:
        """The last pages: the encoder's held samples and padding, the last page EOS with the
        granule position that trims the padding, so the stream decodes to exactly the samples
        written (at 48 kHz)."""
        packets = []
        if not self._samples:
            # an Ogg Opus stream needs an audio packet to end on; the end granule trims it
            packets += self._context.encode(self._frame(np.zeros((1, self.channels), np.float32)))
        packets += self._context.encode(None)
        rate = self.sample_rate
        end = self.pre_skip + (self._samples * OPUS_RATE + rate // 2) // rate
        return self._pages(packets, end=end)

    def _frame(self, samples: np.ndarray) -> av.AudioFrame:
        packed = np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(packed, format="flt", layout=self._context.layout)
        frame.sample_rate = self.sample_rate
        return frame

    def _pages(self, packets: list[av.Packet], end: int | None) -> bytes:
        """``packets`` on as few pages as hold them; with ``end``, the last page is EOS and its
        granule position ``end`` (RFC 7845, 4.5)."""
        pages: list[bytes] = []
        page: list[bytes] = []
        lacing = 0
        for packet in map(bytes, packets):
            if lacing + len(packet) // 255 + 1 > _MAX_LACING:
                pages.append(self._page(page, self._granule, 0))
                page, lacing = [], 0
            page.append(packet)
            lacing += len(packet) // 255 + 1
            self._granule += packet_samples(packet)
        if page and end is not None:
            pages.append(self._page(page, end, _EOS))
        elif page:
            pages.append(self._page(page, self._granule, 0))
        return b"".join(pages)

    def _page(self, packets: list[bytes], granule: int, flags: int) -> bytes:
        page = ogg_page(packets, granule, self._serial, self._sequence, flags)
        self._sequence += 1
        return page
