"""Streaming multipart upload: the `file` part goes straight to disk and stops at the size limit."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.errors import PayloadTooLarge, Unprocessable

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# Room for the multipart envelope and small text fields on top of the file itself.
_ENVELOPE_BYTES = 64 * 1024
# Body bytes gathered before they are parsed (in a worker thread).
_BATCH_BYTES = 1024 * 1024
_MAX_FIELD_BYTES = 4096


@dataclass
class ReceivedUpload:
    """The file part written to `path`, with its size, sha256 and the form's text fields."""

    path: Path
    filename: str
    size_bytes: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)


class _UploadReceiver:
    """python-multipart callbacks: one `file` part to disk (hashed, size-capped), text fields in memory."""

    def __init__(self, destination: Path, max_bytes: int, file_field: str) -> None:
        self.destination = destination
        self.max_bytes = max_bytes
        self.file_field = file_field
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self.digest = hashlib.sha256()
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._part_name: str | None = None
        self._part_is_file = False
        self._field_buffer = bytearray()
        self._file: IO[bytes] | None = None

    def on_part_begin(self) -> None:
        self._headers = {}
        self._part_name = None
        self._part_is_file = False
        self._field_buffer = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._part_name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._part_name == self.file_field and b"filename" in options:
            if self._file is not None:
                raise Unprocessable(f"Send exactly one '{self.file_field}' part.")
            self._part_is_file = True
            self.filename = os.path.basename(options[b"filename"].decode("utf-8", "replace"))
            self._file = self.destination.open("wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._part_is_file:
            assert self._file is not None
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise PayloadTooLarge(
                    f"The upload is larger than the limit of {self.max_bytes} bytes (MAX_UPLOAD_BYTES).",
                    max_upload_bytes=self.max_bytes,
                )
            self.digest.update(chunk)
            self._file.write(chunk)
        else:
            self._field_buffer += chunk
            if len(self._field_buffer) > _MAX_FIELD_BYTES:
                raise Unprocessable(
                    f"Form field '{self._part_name}' is longer than {_MAX_FIELD_BYTES} bytes."
                )

    def on_part_end(self) -> None:
        if self._part_is_file:
            assert self._file is not None
            self._file.flush()
        elif self._part_name:
            self.fields[self._part_name] = self._field_buffer.decode("utf-8", "replace")

    def on_end(self) -> None:
        return None

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }


async def receive_upload(
    request: Request, *, destination: Path, max_bytes: int, file_field: str = "file"
) -> ReceivedUpload:
    """Stream a multipart/form-data body; its `file_field` part goes to `destination` (removed on error)."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise Unprocessable(
            f"Send the dataset as multipart/form-data with a '{file_field}' part "
            f"(curl -F {file_field}=@data.csv)."
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + _ENVELOPE_BYTES:
        raise PayloadTooLarge(
            f"The upload is larger than the limit of {max_bytes} bytes (MAX_UPLOAD_BYTES).",
            max_upload_bytes=max_bytes,
        )
    receiver = _UploadReceiver(destination, max_bytes, file_field)
    parser = MultipartParser(params[b"boundary"], receiver.callbacks())
    try:
        # The body arrives in ~64 KiB chunks; they are parsed, hashed and written in a worker thread, in
        # batches of _BATCH_BYTES, so the event loop only gathers them (hashing and file writes release the
        # GIL: other requests keep being answered while a large upload streams in).
        pending: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            pending.append(chunk)
            size += len(chunk)
            if size >= _BATCH_BYTES:
                await anyio.to_thread.run_sync(parser.write, b"".join(pending))
                pending, size = [], 0
        if pending:
            await anyio.to_thread.run_sync(parser.write, b"".join(pending))
        parser.finalize()
    except FormParserError as exc:
        destination.unlink(missing_ok=True)
        raise Unprocessable(f"The multipart body is malformed: {exc}") from exc
    except (PayloadTooLarge, Unprocessable, ClientDisconnect):
        destination.unlink(missing_ok=True)
        raise
    finally:
        receiver.close()
    if receiver.filename is None:
        destination.unlink(missing_ok=True)
        raise Unprocessable(f"No '{file_field}' file part in the form (curl -F {file_field}=@data.csv).")
    return ReceivedUpload(
        path=destination,
        filename=receiver.filename,
        size_bytes=receiver.size,
        sha256=receiver.digest.hexdigest(),
        fields=receiver.fields,
    )
