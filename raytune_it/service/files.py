"""The Files API's uploads: streamed through a spool file on the replica's disk, checked record by record,
then copied into storage. A file is never held whole in memory, and one that is too big or has a bad record
never reaches storage (its spool file is removed).

The multipart body is parsed as it arrives by python-multipart (Starlette's own parser), so the size
limit stops an upload at the first byte past it rather than after the client has sent it all.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from raytune_it.errors import DataError
from raytune_it.service.errors import ApiError
from raytune_it.service.store import ServiceStore, new_id, now
from raytune_it.storage import Location

PURPOSES = ("fine-tune",)
RESULTS_PURPOSE = "fine-tune-results"
FIELD_LIMIT = 4096  # bytes of a form field that is not the file (purpose)
COPY_CHUNK = 8 << 20
PUBLIC_KEYS = ("id", "object", "bytes", "created_at", "filename", "purpose", "status", "status_details",
               "expires_at")


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the file is over serve.max_file_bytes ({limit} bytes)", "file_too_large", "file")


@dataclass
class Upload:
    """What a multipart upload carried: its small fields, and the file part spooled to ``path``."""

    path: Path
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    size: int = 0


async def receive_upload(chunks: AsyncIterator[bytes], content_type: str, limit: int, spool: Path) -> Upload:
    """Parse a ``multipart/form-data`` stream, writing the part named ``file`` to ``spool``."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise ApiError(400, "an upload is multipart/form-data with the fields 'file' and 'purpose'",
                       "invalid_request")
    upload, pending = Upload(spool), []
    part: dict[str, Any] = {}
    header = [b"", b""]

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, data=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        part["headers"][header[0].decode("latin-1").lower()] = header[1]
        header[0], header[1] = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(part["headers"].get("content-disposition", b""))
        part["name"] = disposition.get(b"name", b"").decode("utf-8", "replace")
        if part["name"] == "file":
            upload.filename = disposition.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part.get("name") == "file":
            upload.size += end - start
            pending.append(data[start:end])
        elif sum(map(len, part["data"])) < FIELD_LIMIT:
            part["data"].append(data[start:end])

    def on_part_end() -> None:
        if part.get("name") and part["name"] != "file":
            upload.fields[part["name"]] = b"".join(part["data"]).decode("utf-8", "replace").strip()

    parser = MultipartParser(options[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end})
    with spool.open("wb") as sink:
        try:
            async for chunk in chunks:
                parser.write(chunk)
                if upload.size > limit:
                    raise too_large(limit)
                if pending:
                    await asyncio.to_thread(sink.writelines, list(pending))
                    pending.clear()
            parser.finalize()
        except FormParserError as exc:  # a body that is not the multipart its header says
            raise ApiError(400, f"the upload is not valid multipart/form-data ({exc}); send the fields 'file' "
                                "and 'purpose' as a form", "invalid_request") from None
    if upload.filename is None:
        raise ApiError(400, "the upload has no 'file' part", "invalid_request", "file")
    return upload


def check_records(path: Path, filename: str) -> dict[str, Any]:
    """The file's type, record format and record count, each record validated as training reads it; a bad
    record is a 400 naming the uploaded file's line."""
    from raytune_it.config.paths import SUFFIX_TYPES
    from raytune_it.data.records import detect_file_type, detect_record_format, iter_records

    if Path(filename).suffix.lower() not in SUFFIX_TYPES:
        raise ApiError(400, f"{filename}: the name must end in {', '.join(SUFFIX_TYPES)}, which tells the file's "
                            "type (JSON Lines, a JSON array or Parquet)", "invalid_file", "file")
    try:
        file_type = detect_file_type(path)
        record_format = detect_record_format(path, file_type)
        records = sum(1 for _ in iter_records(path, file_type, record_format=record_format))
    except DataError as exc:
        message = str(exc).replace(str(path), filename)
        message = message.split(" Fix the record, or set data.skip_bad_records")[0].rstrip(". ")
        raise ApiError(400, f"{message}. Fix the record and upload the file again", "invalid_file", "file") \
            from None
    return {"file_type": file_type, "format": record_format, "records": records}


def data_location(store: ServiceStore, document: dict[str, Any]) -> Location:
    suffix = {"jsonl": "jsonl", "json": "json", "parquet": "parquet", "csv": "csv"}[document["file_type"]]
    return store.file_folder(document["id"]) / f"data.{suffix}"


def copy_to_storage(path: Path, target: Location) -> None:
    with path.open("rb") as source, target.open_output_stream() as sink:
        while chunk := source.read(COPY_CHUNK):
            sink.write(chunk)


def spool_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="raytune-it-upload-"))


async def create_file(store: ServiceStore, organization: str, chunks: AsyncIterator[bytes], content_type: str,
                      limit: int) -> dict[str, Any]:
    folder = spool_folder()
    try:
        upload = await receive_upload(chunks, content_type, limit, folder / "upload")
        purpose = upload.fields.get("purpose")
        if purpose not in PURPOSES:
            raise ApiError(400, f"purpose: got {purpose!r}; this service takes {', '.join(PURPOSES)}",
                           "invalid_request", "purpose")
        filename = Path(upload.filename or "upload.jsonl").name or "upload.jsonl"
        named = folder / filename  # its suffix tells the file type
        upload.path.rename(named)
        checked = await asyncio.to_thread(check_records, named, filename)
        document = {"id": new_id("file"), "object": "file", "bytes": upload.size, "created_at": now(),
                    "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
                    "expires_at": None, "organization": organization, **checked}
        await asyncio.to_thread(copy_to_storage, named, data_location(store, document))
        await asyncio.to_thread(store.save_file, document)
        return document
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_result_file(store: ServiceStore, organization: str, filename: str, text: str) -> dict[str, Any]:
    """A file the service writes (a job's metrics CSV), owned by the job's organization."""
    data = text.encode()
    document = {"id": new_id("file"), "object": "file", "bytes": len(data), "created_at": now(),
                "filename": filename, "purpose": RESULTS_PURPOSE, "status": "processed", "status_details": None,
                "expires_at": None, "organization": organization, "file_type": "csv", "format": None,
                "records": text.count("\n") - 1}
    data_location(store, document).write_bytes(data)
    store.save_file(document)
    return document


def public(document: dict[str, Any]) -> dict[str, Any]:
    return {key: document.get(key) for key in PUBLIC_KEYS}


def content_chunks(store: ServiceStore, document: dict[str, Any]) -> Iterator[bytes]:
    with data_location(store, document).open_input_file() as source:
        while chunk := source.read(COPY_CHUNK):
            yield chunk
