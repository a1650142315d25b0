"""Where a workspace lives: a local directory, or a prefix of an S3-compatible bucket.

`workspace: s3://bucket/prefix` lets stages on different machines share their outputs.
Stages never work on S3 directly: they build in a local directory, and `StageDir`
(tasks/core/workspace.py) uploads a committed stage and downloads one to reuse it, through
`RemoteStore`. S3 has no rename, so the uploaded manifest, written last, is the only
commit marker there.

Credentials come only from the standard AWS sources (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `~/.aws`, instance roles), the endpoint of
a non-AWS service (MinIO, moto, ...) from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`,
the region from `AWS_REGION` or `AWS_DEFAULT_REGION`. None of them is ever logged.

Local copies of remote stages go to `$GPTFLOW_CACHE/s3/<bucket>/<prefix>/`
(`~/.cache/gptflow` by default), so every stage and `model/` keep working on local paths.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import pyarrow.fs as pafs
from pydantic import BeforeValidator

from model.errors import UserError

S3_SCHEME = "s3://"
COPY_BYTES = 8 << 20


def is_remote(workspace: Path | str) -> bool:
    return isinstance(workspace, str) and workspace.startswith(S3_SCHEME)


def parse_workspace(value: object) -> object:
    """A config's `workspace`: an `s3://` URI stays a string, anything else is a local path."""
    if isinstance(value, str) and not is_remote(value):
        return Path(value)
    if isinstance(value, str) and not urlsplit(value).netloc:
        raise ValueError(f"{value!r} names no bucket: use s3://bucket/prefix")
    return value


# The type of a config's `workspace` field.
Workspace = Annotated[Path | str, BeforeValidator(parse_workspace)]


def resolve_workspace(workspace: Path | str) -> Path | str:
    """An absolute local path, or the S3 URI without a trailing slash."""
    return workspace.rstrip("/") if is_remote(workspace) else Path(workspace).resolve()


def filesystem(location: Path | str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and a path in it for a local directory or an `s3://` URI."""
    if is_remote(location):
        store = RemoteStore(location)
        return store.fs, store.root
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def cache_root() -> Path:
    return Path(os.environ.get("GPTFLOW_CACHE") or Path.home() / ".cache" / "gptflow")


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if not endpoint:
        return pafs.S3FileSystem(region=region)
    parts = urlsplit(endpoint)
    return pafs.S3FileSystem(
        region=region,
        endpoint_override=parts.netloc or parts.path,
        scheme=parts.scheme or "https",
        force_virtual_addressing=False,  # endpoints of other services address buckets by path
    )


class RemoteStore:
    """The files under one S3 prefix, by path relative to it."""

    def __init__(self, uri: str):
        parts = urlsplit(uri)
        self.uri = uri.rstrip("/")
        self.root = f"{parts.netloc}{parts.path}".rstrip("/")
        self.fs = s3_filesystem()

    def local_cache(self) -> Path:
        """Where this prefix's files are copied to on this machine."""
        return cache_root() / "s3" / self.root

    def _key(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def _failed(self, action: str, relative: str, error: OSError) -> UserError:
        return UserError(f"{self.uri}/{relative}: cannot {action} ({error})")

    def exists(self, relative: str) -> bool:
        try:
            return self.fs.get_file_info(self._key(relative)).type == pafs.FileType.File
        except OSError as e:
            raise self._failed("look up", relative, e) from e

    def read_bytes(self, relative: str) -> bytes:
        try:
            with self.fs.open_input_stream(self._key(relative)) as stream:
                return stream.readall()
        except OSError as e:
            raise self._failed("read", relative, e) from e

    def download(self, relative: str, local: Path) -> None:
        try:
            with self.fs.open_input_stream(self._key(relative)) as stream, open(local, "wb") as out:
                while block := stream.read(COPY_BYTES):
                    out.write(block)
        except OSError as e:
            raise self._failed("download", relative, e) from e

    def files(self) -> list[pafs.FileInfo]:
        """Every object under the prefix (paths relative to it in `path`), with size and mtime."""
        try:
            found = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        except OSError as e:
            raise self._failed("list", "", e) from e
        return [info for info in found if info.type == pafs.FileType.File]

    def subdirectories(self) -> list[str]:
        """The names of the "directories" (common prefixes) right under the prefix."""
        try:
            found = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except OSError as e:
            raise self._failed("list", "", e) from e
        return sorted(info.base_name for info in found if info.type == pafs.FileType.Directory)

    def put_empty(self, relative: str) -> None:
        """An empty object: a marker."""
        try:
            with self.fs.open_output_stream(self._key(relative)):
                pass
        except OSError as e:
            raise self._failed("write", relative, e) from e

    def delete(self, relative: str = "") -> None:
        """Delete the object `relative`, or every object under it if it is a prefix (all of
        them with the default)."""
        key = self._key(relative).rstrip("/")
        try:
            if self.fs.get_file_info(key).type == pafs.FileType.File:
                self.fs.delete_file(key)
            else:
                self.fs.delete_dir_contents(key, missing_dir_ok=True)
        except OSError as e:
            raise self._failed("delete", relative, e) from e

    def upload(self, local: Path, relative: str) -> None:
        """Copy a local file to the store; an object that was there is replaced whole."""
        try:
            with open(local, "rb") as source, self.fs.open_output_stream(self._key(relative)) as out:
                while block := source.read(COPY_BYTES):
                    out.write(block)
        except OSError as e:
            raise self._failed("upload", relative, e) from e
