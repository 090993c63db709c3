"""Open input files as byte streams, decompressing gzip, bzip2, xz and zstd on the fly.

Public preference sets ship as `.jsonl.gz` (Anthropic HH, HelpSteer) or `.zst`; the readers
stream lines and chunks out of the decompressor, so memory stays what it is for plain files.
The suffix names the compression and the magic bytes confirm it: a file whose first bytes are
another codec's is read with that codec, one whose bytes match none while its name says
compressed is refused in one line. The run id still hashes the file's bytes as stored.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from curation.errors import WinnowError

# suffix -> codec; the codec names are what error messages say
COMPRESSION_SUFFIXES = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
_MAGIC = (
    ("gzip", b"\x1f\x8b"),
    ("bzip2", b"BZh"),
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
)
_HEAD = 8


def _zstd_errors() -> tuple[type[BaseException], ...]:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - a declared dependency; absent only in a broken install
        return ()
    return (zstandard.ZstdError,)


# What a damaged or truncated stream raises while being read (gzip and bz2 raise OSError and
# EOFError, xz LZMAError, zlib its own error, zstandard ZstdError); plain files raise OSError.
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError, zlib.error, *_zstd_errors())


def describe_read_error(exc: BaseException) -> str:
    """One line for a read failure: the codec's message, or the OS error's text."""
    text = (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def compression_of_name(path: Path | str) -> str | None:
    """The codec a file's last suffix names, or None for a plain name."""
    return COMPRESSION_SUFFIXES.get(Path(path).suffix.lower())


def sniff(head: bytes) -> str | None:
    """The codec whose magic number starts `head`, or None.

    Safe on plain text: gzip's, xz's and zstd's magic hold bytes no UTF-8 text starts with;
    bzip2's "BZh" must be followed by a block size digit and the block magic "1AY&SY".
    """
    for codec, magic in _MAGIC:
        if head.startswith(magic):
            if codec == "bzip2" and not (len(head) >= 4 and head[3:4].isdigit()):
                continue
            return codec
    return None


def _decompressor(codec: str, raw: BinaryIO, path: Path | str) -> BinaryIO:
    if codec == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if codec == "bzip2":
        return bz2.BZ2File(raw, mode="rb")
    if codec == "xz":
        return lzma.LZMAFile(raw, mode="rb")
    try:
        import zstandard
    except ImportError:  # pragma: no cover - see _zstd_errors
        raise WinnowError("reading .zst files needs the zstandard package: pip install 'zstandard>=0.22,<1'") from None
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
    return io.BufferedReader(_CheckedZstd(reader, path))


class _CheckedZstd(io.RawIOBase):
    """zstandard's stream reader, which ends quietly on a truncated file, made to say so.

    At the end of the decompressed data the file's frames are walked (headers only): a file
    that stops inside a frame raises EOFError, as gzip, bz2 and xz do.
    """

    def __init__(self, reader: BinaryIO, path: Path | str) -> None:
        self.reader, self.path, self.checked = reader, path, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer
        count = self.reader.readinto(buffer)
        if count == 0 and not self.checked:
            self.checked = True
            problem = zstd_frames_problem(self.path)
            if problem:
                raise EOFError(problem)
        return count


def zstd_frames_problem(path: Path | str) -> str | None:
    """Why a .zst file's frames are incomplete (truncated), or None; reads frame and block headers only.

    The layout is RFC 8878's: a frame header, then blocks of 3-byte headers (last-block bit,
    type, size), then an optional 4-byte checksum; skippable frames carry their own size.
    """
    with open(path, "rb") as handle:
        end = handle.seek(0, io.SEEK_END)
        pos = 0
        while pos < end:
            handle.seek(pos)
            magic = int.from_bytes(handle.read(4), "little")
            if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
                pos += 8 + int.from_bytes(handle.read(4), "little")
                continue
            if magic != 0xFD2FB528:
                return f"no zstd frame at byte {pos}"
            descriptor = handle.read(1)[0] if pos + 5 <= end else 0
            single = bool(descriptor & 0x20)
            size_flag, dict_flag = descriptor >> 6, descriptor & 0x3
            pos += 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + ((1 if single else 0), 2, 4, 8)[size_flag]
            while True:
                handle.seek(pos)
                header = handle.read(3)
                if len(header) < 3:
                    return "the zstd data ends in the middle of a frame (truncated?)"
                value = int.from_bytes(header, "little")
                kind, size = (value >> 1) & 0x3, value >> 3
                pos += 3 + (1 if kind == 1 else size)
                if value & 1:
                    break
            pos += 4 if descriptor & 0x4 else 0
        return "the zstd data ends in the middle of a frame (truncated?)" if pos > end else None


@contextmanager
def open_bytes(path: Path | str) -> Iterator[BinaryIO]:
    """The file's content as a readable byte stream, decompressed when it is compressed.

    An unreadable file (permissions, a folder, gone) and a name that promises a codec the
    bytes do not carry are one-line errors.
    """
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed below, after the decompressor
    except OSError as exc:
        raise WinnowError(f"{path}: cannot open ({exc.strerror or exc})") from None
    try:
        try:
            head = raw.peek(_HEAD)[:_HEAD] if hasattr(raw, "peek") else b""
        except OSError as exc:
            raise WinnowError(f"{path}: cannot read ({exc.strerror or exc})") from None
        codec = sniff(head)
        named = compression_of_name(path)
        if codec is None and named is not None and head:
            raise WinnowError(f"{path}: not a {named} file (its first bytes are not {named}'s magic number)")
        if codec is None:
            yield raw
            return
        stream = _decompressor(codec, raw, path)
        try:
            yield stream
        finally:
            stream.close()
    finally:
        raw.close()
