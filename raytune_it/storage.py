"""Where runs live: a local folder or a remote URI, opened through pyarrow.fs.

``run.storage`` (and any model, adapter or run folder a command is given) is a
local path or a URI that pyarrow.fs understands: ``s3://bucket/prefix`` (an
S3-compatible endpoint in the query: ``?endpoint_override=host:port&scheme=http``,
or ``AWS_ENDPOINT_URL``), ``gs://bucket/prefix``, ``hdfs://...``,
``file:///path``. pyarrow.fs is Ray Train's own storage layer, so checkpoints,
Tune state and everything raytune-it writes share one filesystem object.

Credentials never appear in a URI (it is saved in ``config.yaml`` and printed):
every node reads them from its own AWS / GCP credential chain (environment
variables, instance profile, workload identity). A :class:`Location` holds the
filesystem object itself and pickles with it, so workers and replicas open the
same storage the driver opened.

A folder that must be all there or not at all (an export, ``best/``) is
*published*: written first, then committed, by a rename on a local disk or by
its manifest ``_PUBLISHED.json``, written last, on object storage. Readers that
fetch a folder into the local cache check the manifest's file sizes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit

from raytune_it.errors import ConfigError, UserError

#: URI schemes accepted for storage (those pyarrow.fs opens from a URI).
SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")
MANIFEST = "_PUBLISHED.json"
#: Never fetched from storage: pickled weights are never loaded (safetensors only).
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(text: str) -> bool:
    return bool(_SCHEME.match(text))


def uri_problem(text: str) -> str | None:
    """What is wrong with a storage URI, checked without the network: None for a local path or a good URI."""
    match = _SCHEME.match(text)
    if not match:
        return None
    scheme = match.group(1).lower()
    if scheme not in SCHEMES:
        return (f"scheme {scheme!r} is not supported; allowed: a local path, or "
                f"{', '.join(s + '://' for s in SCHEMES)}")
    parts = urlsplit(text)
    if has_credentials(text):
        return ("credentials in the URI would be saved in config.yaml and shown in logs; remove them and give "
                "them to every node the usual way (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, an instance "
                "profile, GOOGLE_APPLICATION_CREDENTIALS)")
    if scheme != "file" and not parts.netloc:
        return f"it names no bucket or host; write it as {scheme}://bucket/prefix"
    return None


#: A query parameter that carries a secret (``?access_key=``, ``&token=``), and its value.
_SECRET_QUERY = re.compile(r"([?&][\w.-]*(?:access_key|secret|token|password|api_key)[\w.-]*=)[^&#\s'\"]*", re.I)


def has_credentials(text: str) -> bool:
    """Whether a URI carries a secret (``user:password@``, a key or token in its query): such a URI would be
    saved in config.yaml and shown in logs."""
    parts = urlsplit(text)
    return bool(parts.username or parts.password or _SECRET_QUERY.search("?" + parts.query))


def check_uri(text: str, key: str) -> None:
    problem = uri_problem(text)
    if problem:
        raise ConfigError(f"{key}: {redact_uri(text)!r}: {problem}")


def storage_cause(exc: OSError) -> str:
    """pyarrow's storage error without the request id: the part a person can act on."""
    return str(exc).split(" (Request ID")[0]


def folder_name(path_or_uri: str) -> str:
    """The last path segment of a local path or URI (its query cut off): a model's default served name."""
    return path_or_uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def redact_uri(text: str) -> str:
    """Text with any ``user:password@`` of a URI cut out and secret query values hidden, for messages and
    logs."""
    return _SECRET_QUERY.sub(r"\1<redacted>", re.sub(r"//[^/@\s'\"]*@", "//", text))


@dataclass(frozen=True)
class Location:
    """A file or folder in storage: the pyarrow filesystem, the path on it, and the URI a user writes."""

    filesystem: Any
    path: str
    uri: str

    # --- names ------------------------------------------------------------------------------

    def __truediv__(self, name: str) -> "Location":
        name = str(name).strip("/")
        if self.is_local:
            joined = os.path.join(self.path, name)
            return Location(self.filesystem, joined, joined)
        base, sep, query = self.uri.partition("?")
        return Location(self.filesystem, f"{self.path.rstrip('/')}/{name}", f"{base.rstrip('/')}/{name}{sep}{query}")

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        head = self.path.rstrip("/").rsplit("/", 1)[0]
        if self.is_local:
            return Location(self.filesystem, head, head)
        base, sep, query = self.uri.partition("?")
        return Location(self.filesystem, head, f"{base.rstrip('/').rsplit('/', 1)[0]}{sep}{query}")

    @property
    def is_local(self) -> bool:
        from pyarrow.fs import LocalFileSystem

        return isinstance(self.filesystem, LocalFileSystem)

    def __str__(self) -> str:
        return self.uri

    # --- reading ----------------------------------------------------------------------------

    def _info(self) -> Any:
        return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type != FileType.NotFound

    def is_file(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type == FileType.File

    def files(self) -> dict[str, int]:
        """Relative path -> size of every file below this folder."""
        from pyarrow.fs import FileSelector, FileType

        root = self.path.rstrip("/") + "/"
        infos = self.filesystem.get_file_info(FileSelector(self.path, recursive=True, allow_not_found=True))
        return {info.path[len(root):]: info.size for info in infos if info.type == FileType.File}

    def listdir(self) -> list[str]:
        from pyarrow.fs import FileSelector

        return sorted(info.base_name for info in
                      self.filesystem.get_file_info(FileSelector(self.path, allow_not_found=True)))

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as handle:
            return handle.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open_input_file(self) -> Any:
        return self.filesystem.open_input_file(self.path)

    # --- writing ----------------------------------------------------------------------------

    def mkdir(self) -> None:
        self.filesystem.create_dir(self.path, recursive=True)

    @contextlib.contextmanager
    def writer(self) -> Iterator[Any]:
        """A binary stream that lands whole or not at all: a local file is written beside the target and
        renamed into place (and removed if writing fails); an object store's upload lands on close (pyarrow
        completes it even when the writing failed, so the object is then deleted)."""
        if not self.is_local:
            try:
                with self.filesystem.open_output_stream(self.path) as handle:
                    yield handle
            except BaseException:
                with contextlib.suppress(OSError):
                    self.filesystem.delete_file(self.path)
                raise
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        staging = f"{self.path}.partial-{uuid.uuid4().hex[:8]}"
        try:
            with open(staging, "wb") as handle:
                yield handle
            os.replace(staging, self.path)
        finally:
            if os.path.exists(staging):
                os.remove(staging)

    def write_bytes(self, data: bytes) -> None:
        with self.writer() as handle:
            handle.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def open_output_stream(self) -> Any:
        if self.is_local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        return self.filesystem.open_output_stream(self.path)

    def delete(self) -> None:
        from pyarrow.fs import FileType

        kind = self._info().type
        if kind == FileType.File:
            self.filesystem.delete_file(self.path)
        elif kind == FileType.Directory:
            self.filesystem.delete_dir(self.path)


def local(path: str | Path) -> Location:
    from pyarrow.fs import LocalFileSystem

    resolved = str(Path(os.path.expanduser(str(path))).resolve())
    return Location(LocalFileSystem(), resolved, resolved)


def open_location(text: str, key: str = "run.storage") -> Location:
    """A local path or storage URI as a :class:`Location`; a bad one raises ConfigError naming ``key``."""
    if not is_uri(text):
        return local(text)
    check_uri(text, key)
    from pyarrow.fs import FileSystem, LocalFileSystem

    try:
        filesystem, path = FileSystem.from_uri(text)
    except Exception as exc:  # pyarrow's ArrowInvalid / OSError: a malformed URI or an unknown option
        raise ConfigError(f"{key}: cannot open {redact_uri(text)!r}: {exc}") from None
    if isinstance(filesystem, LocalFileSystem):
        return local(path)
    return Location(filesystem, path.rstrip("/"), text)


def as_location(target: "str | Path | Location", key: str = "run.storage") -> Location:
    if isinstance(target, Location):
        return target
    if isinstance(target, Path):
        return local(target)
    return open_location(target, key)


def write_named_file(target: str, key: str, chunks: Iterable[bytes]) -> Location:
    """Write a file a user named by a flag or argument (a local path or storage URI), whole or not at all: a
    folder, or a place that cannot be written, is one UserError naming ``key``."""
    location = as_location(target, key)
    try:
        if target.endswith("/") or (location.exists() and not location.is_file()):
            raise UserError(f"{key}: {redact_uri(target)} is a folder; name the file to write inside it")
        with location.writer() as handle:
            for chunk in chunks:
                handle.write(chunk)
    except OSError as exc:
        cause = exc.strerror if location.is_local and exc.strerror else storage_cause(exc)
        raise UserError(f"{key}: cannot write {redact_uri(location.uri)}: {cause}") from None
    return location


def check_writable(location: Location, key: str = "run.storage") -> None:
    """Fail before any worker starts when storage cannot be written: unreachable, no bucket, no permission.

    Writes and deletes a small probe object, which is what every stage will do.
    """
    if location.is_local:
        try:
            Path(location.path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{key}: cannot create {location.path!r}: {exc.strerror}") from None
    probe = location / f".raytune-it-probe-{uuid.uuid4().hex[:8]}"
    try:
        if not location.is_local:
            bucket = location.path.split("/", 1)[0]
            if not Location(location.filesystem, bucket, bucket).exists():
                raise ConfigError(f"{key}: bucket {bucket!r} does not exist at {redact_uri(location.uri)} "
                                  "(create it first, or check the name and the endpoint)")
        probe.write_bytes(b"raytune-it")
        probe.delete()
    except ConfigError:
        raise
    except OSError as exc:
        cause = storage_cause(exc)
        if "NETWORK_CONNECTION" in cause or "connect" in cause.lower():
            hint = "the storage endpoint is unreachable; check endpoint_override / AWS_ENDPOINT_URL and the network"
        elif "ACCESS_DENIED" in cause or "AccessDenied" in cause or "Forbidden" in cause:
            hint = "no write permission; give this node's credentials write access to the prefix"
        else:
            hint = "cannot write there"
        raise ConfigError(f"{key}: {hint} ({redact_uri(location.uri)}: {cause})") from None


# --- publishing folders --------------------------------------------------------------------


def publish_dir(source: "Path | Location", dest: Location, extra: dict[str, str] | None = None) -> None:
    """Copy a folder to ``dest`` so that readers see the old folder, nothing, or the whole new one.

    ``extra`` adds small text files (name -> content) to the published folder.
    """
    import pyarrow.fs as pafs

    src = source if isinstance(source, Location) else local(source)
    files = {name: size for name, size in src.files().items() if name != MANIFEST}
    extra = extra or {}
    manifest = json.dumps({"files": {**files, **{n: len(t.encode()) for n, t in extra.items()}},
                           "published_at": time.time()}, indent=1)
    if dest.is_local:
        staging = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
        staging.mkdir()  # copy_files creates only the folders below it
        pafs.copy_files(src.path, staging.path, source_filesystem=src.filesystem,
                        destination_filesystem=dest.filesystem)
        for name, text in {**extra, MANIFEST: manifest}.items():
            (staging / name).write_text(text)
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        if dest.exists():
            os.replace(dest.path, old.path)
        os.replace(staging.path, dest.path)
        shutil.rmtree(old.path, ignore_errors=True)
        return
    # Object stores have no folder rename: retract the old manifest first, write, and commit last.
    (dest / MANIFEST).delete()
    dest.delete()
    pafs.copy_files(src.path, dest.path, source_filesystem=src.filesystem, destination_filesystem=dest.filesystem)
    for name, text in extra.items():
        (dest / name).write_text(text)
    (dest / MANIFEST).write_text(manifest)


def is_published(folder: Location) -> bool:
    return (folder / MANIFEST).is_file()


def cache_root() -> Path:
    from raytune_it.cache import cache_dir

    return cache_dir() / "storage"


def fetch_dir(folder: Location, key: str, *, weights: bool = True) -> Path:
    """A storage folder as a local directory: itself on a local disk, else a checked copy in this node's cache.

    The copy is keyed by the URI and the folder's manifest (or listing), so a re-published folder is fetched
    again and an unchanged one is not. Pickle files are never fetched; without ``weights`` neither are
    ``*.safetensors`` (a config and tokenizer are all a driver needs of a 65B model).
    """
    from filelock import FileLock

    if folder.is_local:
        return Path(folder.path)
    try:
        listing = folder.files()
    except OSError as exc:
        raise UserError(f"{key}: cannot read {redact_uri(folder.uri)}: {storage_cause(exc)}") from None
    if not listing:
        raise UserError(f"{key}: {redact_uri(folder.uri)} is empty or does not exist")
    manifest = (folder / MANIFEST).read_text() if MANIFEST in listing else None
    expected = json.loads(manifest)["files"] if manifest is not None else None
    signature = manifest if manifest is not None else json.dumps(sorted(listing.items()))
    digest = hashlib.sha256(f"{folder.uri}\n{signature}".encode()).hexdigest()[:16]
    target = cache_root() / f"{folder.name}-{digest}{'' if weights else '-meta'}"
    if target.is_dir():  # complete: a fetch appears only by its final rename
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=3600):
        if target.is_dir():
            return target
        staging = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
        skipped = UNSAFE_SUFFIXES + (() if weights else (".safetensors",))
        wanted = [name for name in (expected or listing) if not name.endswith(skipped) and name != MANIFEST]
        _download(folder, staging, wanted)
        if expected is not None:
            for name in wanted:
                size = (staging / name).stat().st_size
                if size != expected[name]:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise UserError(f"{key}: {name} in {redact_uri(folder.uri)} is {size} bytes, its manifest says "
                                    f"{expected[name]}; the folder changed while it was read: try again")
            (staging / MANIFEST).write_text(manifest or "")
        else:
            (staging / ".fetched").write_text(folder.uri)
        os.replace(staging, target)
    return target


def fetch_file(file: Location, key: str) -> Path:
    """A storage file as a local file (kept under its own name): itself on a local disk, else a copy in this
    node's cache, fetched again when its size or modification time changes."""
    from filelock import FileLock

    if file.is_local:
        return Path(file.path)
    info = file.filesystem.get_file_info(file.path)
    if not info.is_file:
        raise UserError(f"{key}: {redact_uri(file.uri)} does not exist or is not a file")
    digest = hashlib.sha256(f"{file.uri}\n{info.size}\n{info.mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / digest / file.name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent) + ".lock", timeout=3600):
        if not target.is_file():
            staging = target.with_name(f".{file.name}.partial")
            with file.filesystem.open_input_stream(file.path) as src, staging.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
            os.replace(staging, target)
    return target


def _download(folder: Location, staging: Path, names: Iterable[str]) -> None:
    for name in names:
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with folder.filesystem.open_input_stream((folder / name).path) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
