"""Sources: where samples come from, each with a stable string uid (never a row number).

Image sources (``ImageFolderSource``, ``WebDatasetSource``, ``TableSource``) list ``SampleRef``s and read a ref's raw
bytes; decoding is ``pipeline.decode``'s job. ``PrecomputedSource`` reads LAION/DataComp-style embedding shards
(``.npy`` + row-aligned ``.parquet``) that enter the embedding store without a model.

Every source is a small picklable object (plain attributes, no open handles) so it can cross into torch DataLoader
worker processes, and ``describe()`` returns the constructor's kwargs plus ``kind``, so
``source_from_config(src.describe())`` rebuilds an equivalent source.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import stat
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger(__name__)

# Extensions (lower case, with the dot) that ImageFolderSource picks up by default. Files with other or no extension
# are ignored: a folder also holds READMEs, label files and checksums, and anything listed here that is not really an
# image still gets an honest status from decode_image.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".avif", ".jp2", ".j2k", ".qoi",
)


@dataclass(frozen=True, slots=True)  # slots: millions of refs are listed before embedding
class SampleRef:
    """One sample of a source: its uid, where its bytes live, and optional label/caption."""

    uid: str  # stable string id from the source, never a row number
    location: str  # file path / URL, or "<tar path or URL>::<member name>" for webdataset members
    label: str | None = None
    caption: str | None = None
    # webdataset members: (data offset, size) from the listing, so a read needs no member index; not part of equality
    member: tuple[int, int] | None = field(default=None, compare=False, repr=False)


class SourceError(ValueError):
    """Bad source configuration: missing paths, missing columns, misaligned shards, paths escaping a root."""


# Bytes read per file at most, unless a source's `max_file_bytes` says otherwise: a file larger than this is recorded
# with status "too_large" and never read (a link to /dev/zero or a multi-GB file cannot fill the memory).
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024


class RefusedFileError(OSError):
    """A listed file that is refused instead of read; ``status`` is what the store's metadata records for it."""

    status: ClassVar[str] = "io_error"


class NotRegularFileError(RefusedFileError):
    """A FIFO, socket, device or folder (after resolving symlinks), or a tar member that is a link or device."""

    status = "not_regular_file"


class FileTooLargeError(RefusedFileError):
    status = "too_large"


class OutsideRootError(RefusedFileError):
    """A symlink resolving outside the source's root (refused unless ``follow_symlinks``)."""

    status = "outside_root"


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _inside(real: str, real_root: str) -> bool:
    return os.path.commonpath([real, real_root]) == real_root


def check_max_file_bytes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SourceError(f"max_file_bytes must be a positive integer (bytes), got {value!r}")
    return value


def _real_path(location: str, folders: dict[str, str] | None, is_link: bool) -> str:
    """os.path.realpath(location); with `folders` (a source object's cache) each folder is resolved once: realpath
    costs one lstat per path component, which was a fifth of a worker's time per small image. The file itself is
    checked on every call (`is_link`: from the caller's lstat). The cache lives with the source object, i.e. one run,
    so a root that is a symlink re-pointed between scheduled runs is resolved afresh."""
    if folders is None or is_link:
        return os.path.realpath(location)
    folder, name = os.path.split(os.path.abspath(location))
    if folder not in folders:
        if len(folders) >= 65536:  # bounded: a run over millions of folders
            folders.clear()
        folders[folder] = os.path.realpath(folder)
    return os.path.join(folders[folder], name)


def read_file_bounded(location: str, max_bytes: int, *, real_root: str | None = None,
                      resolved_folders: dict[str, str] | None = None) -> bytes:
    """The bytes of one file, refusing what must not be read: a RefusedFileError (an OSError) whose ``status`` says why.

    Local paths are checked with stat before anything is opened (stat never blocks; opening a FIFO does): not a
    regular file after resolving symlinks → not_regular_file; resolving outside ``real_root`` (when given) →
    outside_root; over ``max_bytes`` → too_large. The file is then opened non-blocking, checked again on the open
    descriptor (it may have been swapped since), and read up to max_bytes + 1 bytes. URLs are read up to the same cap.
    """
    location = _local_path(location) or location  # a file:// URL gets the same checks as a path
    if _is_url(location):
        with _open_binary(location) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise FileTooLargeError(f"{location!r} is larger than max_file_bytes ({max_bytes})")
        return data
    # As few system calls as the checks allow (each costs tens of µs in some sandboxes): lstat, and stat only for a link;
    # the descriptor read directly, without a buffered file object's own fstat.
    st = os.lstat(location)
    is_link = stat.S_ISLNK(st.st_mode)
    if is_link:
        st = os.stat(location)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(f"{location!r} is {_file_kind(st.st_mode)}, not a regular file")
    if real_root is not None and not _inside(real := _real_path(location, resolved_folders, is_link), real_root):
        raise OutsideRootError(f"{location!r} resolves to {real!r}, outside the source root")
    if st.st_size > max_bytes:
        raise FileTooLargeError(f"{location!r} has {st.st_size} bytes, more than max_file_bytes ({max_bytes})")
    fd = os.open(location, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise NotRegularFileError(f"{location!r} is {_file_kind(opened.st_mode)}, not a regular file")
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, max(opened.st_size + 1, 1 << 16)))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) > max_bytes:  # grew since stat
        raise FileTooLargeError(f"{location!r} is larger than max_file_bytes ({max_bytes})")
    return data


class DuplicateUidError(ValueError):
    """The same uid occurs more than once in one input; ``duplicates`` holds the first few, ``count`` how many."""

    def __init__(self, message: str, duplicates: Sequence[str] = (), count: int = 0) -> None:
        super().__init__(message)
        self.duplicates = list(duplicates)
        self.count = count


_SHOW_DUPLICATES = 5


def _duplicates(uids: Iterable[str]) -> tuple[list[str], int]:
    """First few duplicated uids (in order of first repetition) and the number of distinct duplicated uids."""
    seen: set[str] = set()
    dup: dict[str, None] = {}  # insertion-ordered set
    for uid in uids:
        if uid in seen:
            dup[uid] = None
        else:
            seen.add(uid)
    return list(dup)[:_SHOW_DUPLICATES], len(dup)


def check_unique_uids(uids: Iterable[str]) -> None:
    """Raises DuplicateUidError naming the first few repeated uids and how many uids repeat."""
    first, count = _duplicates(uids)
    if count:
        more = f" (and {count - len(first)} more)" if count > len(first) else ""
        raise DuplicateUidError(
            f"{count} uid(s) occur more than once: {', '.join(map(repr, first))}{more}", first, count
        )


def _check_refs_unique(refs: Sequence[SampleRef], source: str) -> None:
    """check_unique_uids for refs, with the locations of each shown duplicate so the user can find them."""
    first, count = _duplicates(r.uid for r in refs)
    if not count:
        return
    shown = set(first)
    where: dict[str, list[str]] = {u: [] for u in first}
    for r in refs:
        if r.uid in shown:
            where[r.uid].append(r.location)
    parts = [f"{u!r} at {', '.join(where[u][:3])}{' ...' if len(where[u]) > 3 else ''}" for u in first]
    more = f"; and {count - len(first)} more" if count > len(first) else ""
    raise DuplicateUidError(f"{source}: {count} uid(s) occur more than once: {'; '.join(parts)}{more}", first, count)


class Listing(Sequence[SampleRef]):
    """A source's samples as columns: a polars frame with ``uid`` and optional ``location``, ``label``, ``caption``
    (String), ``size`` and ``token`` (Int64, the change-detection stats, -1 where unknown), ``offset`` (webdataset).

    Listing millions of samples costs bytes per row, not a Python object each: a ``SampleRef`` is built only for the
    row asked for (``listing[i]``, iteration builds them one chunk at a time), and ``take``/slices give the sub-listing
    of one shard to embed. Without a ``location`` column a row's location is ``location_prefix + uid`` (image folders:
    the root's path, so the paths are not held twice). Webdataset listings carry the member's ``size`` and data ``offset``
    (-1 for a link or device member; also the change token) so that a ref is read without a per-member index.
    """

    __slots__ = ("frame", "location_prefix")
    _ITER_CHUNK = 16_384

    def __init__(self, frame: pl.DataFrame, *, location_prefix: str | None = None) -> None:
        if "location" not in frame.columns and location_prefix is None:
            raise ValueError("a Listing needs a location column or a location_prefix")
        self.frame = frame
        self.location_prefix = location_prefix

    @classmethod
    def empty(cls) -> Listing:
        import polars as pl

        return cls(pl.DataFrame(schema={"uid": pl.String, "location": pl.String}))

    def __len__(self) -> int:
        return self.frame.height

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return Listing(self.frame[index], location_prefix=self.location_prefix)
        n = self.frame.height
        i = index.__index__()
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"listing index {index} out of range ({n} samples)")
        return self._ref(self.frame.row(i, named=True))

    def _ref(self, row: dict[str, Any]) -> SampleRef:
        uid = row["uid"]
        location = row["location"] if self.location_prefix is None else self.location_prefix + uid
        member = (row["offset"], row["size"]) if "offset" in row else None
        return SampleRef(uid=uid, location=location, label=row.get("label"), caption=row.get("caption"), member=member)

    def __iter__(self) -> Iterator[SampleRef]:
        for chunk in self.frame.iter_slices(self._ITER_CHUNK):
            for row in chunk.iter_rows(named=True):
                yield self._ref(row)

    def take(self, rows: Sequence[int] | np.ndarray) -> Listing:
        """The sub-listing of these row positions (in the order given): one shard's samples, as columns."""
        import polars as pl

        picks = pl.Series("rows", np.asarray(rows, dtype=np.int64))
        return Listing(self.frame.select(pl.all().gather(picks)), location_prefix=self.location_prefix)

    def uids(self) -> pl.Series:
        return self.frame["uid"]

    def locations(self) -> pl.Series:
        import polars as pl

        if self.location_prefix is None:
            return self.frame["location"]
        return self.frame.select((pl.lit(self.location_prefix) + pl.col("uid")).alias("location"))["location"]

    def labels(self) -> pl.Series | None:
        return self.frame["label"] if "label" in self.frame.columns else None

    def has_labels(self) -> bool:
        labels = self.labels()
        return labels is not None and labels.null_count() < len(labels)

    def stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(size, change token) per row, int64, when the source recorded them while listing (image folders:
        st_size and st_mtime_ns; webdataset: member size and data offset); None otherwise."""
        columns = self.frame.columns
        if "size" not in columns:
            return None
        return self.frame["size"].to_numpy(), self.frame["token" if "token" in columns else "offset"].to_numpy()

    def refs_frame(self) -> pl.DataFrame:
        """uid, location, label, caption as columns (null where the source has none): what a SampleRef holds."""
        import polars as pl

        cols = [pl.col(c) if c in self.frame.columns else pl.lit(None, pl.String).alias(c) for c in ("label", "caption")]
        return self.frame.select("uid", self.locations(), *cols)

    def check_unique(self, source: str) -> None:
        """DuplicateUidError naming the first few repeated uids and their locations."""
        import polars as pl

        repeated = self.frame.with_row_index("_row").filter(pl.col("uid").is_duplicated())
        if repeated.height:
            _check_refs_unique(list(Listing(repeated.drop("_row"), location_prefix=self.location_prefix)), source)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Listing):
            return self.refs_frame().equals(other.refs_frame())
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Listing({len(self)} samples, columns {self.frame.columns})"


_CHUNK_ROWS = 65_536


class _ColumnChunks:
    """Rows appended one at a time into short Python lists, turned into a polars frame every `_CHUNK_ROWS` rows, so a
    directory walk over millions of files holds at most one chunk of Python objects."""

    def __init__(self, schema: dict[str, Any], what: str) -> None:
        self.schema, self.what = schema, what
        self.names = list(schema)
        self.lists: list[list[Any]] = [[] for _ in self.names]
        self.frames: list[pl.DataFrame] = []

    def append(self, *values: Any) -> None:
        for column, value in zip(self.lists, values):
            column.append(value)
        if len(self.lists[0]) >= _CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        import polars as pl

        if not self.lists[0]:
            return
        try:
            frame = pl.DataFrame(dict(zip(self.names, self.lists)), schema=self.schema)
        except UnicodeEncodeError:
            bad = next(v for column in self.lists for v in column if isinstance(v, str) and not _utf8(v))
            raise SourceError(f"{self.what}: {os.fsencode(bad)!r} is not valid UTF-8; uids and paths are UTF-8 strings "
                              "(rename it)") from None
        self.frames.append(frame)
        self.lists = [[] for _ in self.names]

    def frame(self, *, rechunk: bool = True) -> pl.DataFrame:
        """The rows as one frame; ``rechunk=False`` when the caller makes a new frame anyway (a sort): one copy less."""
        import polars as pl

        self._flush()
        if not self.frames:
            return pl.DataFrame(schema=self.schema)
        return pl.concat(self.frames, rechunk=rechunk)


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_url(path: str) -> bool:
    return "://" in path


def _local_path(location: str) -> str | None:
    """The local path of a plain path or a file:// URL; None for other URLs."""
    if location.startswith("file://"):
        return location[len("file://"):]
    return None if _is_url(location) else location


def _open_binary(location: str):
    """Opens a local path with the builtin open (fast) and anything with a protocol through fsspec."""
    if _is_url(location):
        import fsspec

        return fsspec.open(location, "rb").open()
    return open(location, "rb")


class Source:
    """Base class. Image sources implement ``refs``, ``read_bytes`` and ``describe``."""

    kind: ClassVar[str] = ""
    has_images: ClassVar[bool] = True
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

    def __init__(self) -> None:
        self._refs: Listing | None = None
        self._resolved_folders: dict[str, str] = {}  # _real_path's cache of this object's reads
        self._root_resolved: str | None = None
        # folders the last listing could not enter (unreadable, or a folder symlink not followed): {"path", "why"}
        self._unlisted: list[dict[str, str]] = []

    def refs(self) -> Listing:
        """All samples in a deterministic order, as a columnar Listing (a Sequence of SampleRef built on access);
        raises DuplicateUidError when a uid repeats."""
        if self._refs is None:
            listing = self._scan()
            listing.check_unique(self._name())
            self._refs = listing
        return self._refs

    def __len__(self) -> int:
        return len(self.refs())

    def forget_refs(self) -> None:
        """Drops the cached listing (refs() lists the source again if asked)."""
        self._refs = None

    def unlisted_folders(self) -> list[dict[str, str]]:
        """Folders refs() could not list (``{"path": ..., "why": ...}``): images in them are not among the refs."""
        self.refs()
        return list(self._unlisted)

    def read_bytes(self, ref: SampleRef) -> bytes:
        """The raw bytes of ``ref``, at most ``max_file_bytes``; raises an OSError subclass when they cannot or must
        not be read (a RefusedFileError's ``status`` says which)."""
        return read_file_bounded(ref.location, self.max_file_bytes, real_root=self._real_root(),
                                 resolved_folders=self._resolved_folders)

    def _real_root(self) -> str | None:
        """The resolved folder every file must stay inside, or None when the source has no such root."""
        return None

    def _resolved_root(self) -> str:
        """os.path.realpath of the root, once per source object (read_bytes asks for it on every file)."""
        if self._root_resolved is None:
            self._root_resolved = os.path.realpath(getattr(self, "root"))
        return self._root_resolved

    def describe(self) -> dict[str, Any]:
        """``kind`` plus the constructor kwargs, JSON-serialisable (for the store's metadata)."""
        raise NotImplementedError

    def _scan(self) -> Listing:
        raise NotImplementedError

    def _name(self) -> str:
        return f"{type(self).__name__}"

    def __getstate__(self) -> dict[str, Any]:
        # Workers only read bytes; the listing can be millions of rows, so it is not shipped to them.
        state = dict(self.__dict__)
        state["_refs"] = None
        state["_resolved_folders"] = {}  # a per-process cache
        return state

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "kind")
        return f"{type(self).__name__}({params})"


# --------------------------------------------------------------------------------------------------- image folder
class ImageFolderSource(Source):
    """Image files under a directory tree.

    uid = POSIX path relative to ``root`` (e.g. ``"train/cat/0001.jpg"``); order is sorted by uid.
    ``split`` (a subfolder name or a list of them, e.g. ``"train"`` for a ``{train,test}/<class>/*`` layout)
    restricts the scan to ``root/<split>``; uids stay relative to ``root`` so they are unique across splits,
    and labels are taken below the split folder.
    ``labels_from_subfolders``: True → label = first folder below the scanned folder (every image must be inside
    one); False → no labels; None → labels iff every image is inside a subfolder.
    Hidden files and folders (name starting with ".") are skipped; symlinked folders are not followed (cycles) and,
    like folders that cannot be listed (permission denied), are reported by unlisted_folders().
    Every file with a listed extension becomes a ref; one that is not a regular file after resolving symlinks (a FIFO,
    socket, device) or is larger than ``max_file_bytes`` is never opened for reading: its read fails with a status.
    A file symlink resolving outside ``root`` is a SourceError naming it unless ``follow_symlinks`` is True.
    """

    kind = "image_folder"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        split: str | Sequence[str] | None = None,
        labels_from_subfolders: bool | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        follow_symlinks: bool = False,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        super().__init__()
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise SourceError(f"image folder root {self.root!r} is not a directory")
        self.follow_symlinks = bool(follow_symlinks)
        self.max_file_bytes = check_max_file_bytes(max_file_bytes)
        self.split: str | list[str] | None = split if split is None or isinstance(split, str) else list(split)
        self.labels_from_subfolders = labels_from_subfolders
        exts = [extensions] if isinstance(extensions, str) else list(extensions)
        if not exts:
            raise SourceError("extensions must not be empty")
        self.extensions = sorted({e.lower() if e.startswith(".") else "." + e.lower() for e in exts})
        for name in self._splits():
            if not os.path.isdir(os.path.join(self.root, name)):
                raise SourceError(f"split {name!r} is not a folder under {self.root!r}")

    def _splits(self) -> list[str]:
        if self.split is None:
            return [""]
        names = [self.split] if isinstance(self.split, str) else self.split
        for name in names:
            parts = PurePosixPath(name.replace(os.sep, "/")).parts
            if not name or name.startswith("/") or ".." in parts:
                raise SourceError(f"split {name!r} must be a relative folder name under the root")
        return names

    def _real_root(self) -> str | None:
        return None if self.follow_symlinks else self._resolved_root()

    def _walk(self, base: str) -> Iterator[tuple[PurePosixPath, os.DirEntry[str]]]:
        """(folder relative to base, entry) for every non-folder entry with a listed extension under base, hidden
        names skipped. Folders that cannot be listed and folder symlinks go to self._unlisted instead."""
        exts = set(self.extensions)
        stack = [PurePosixPath()]
        while stack:
            rel_dir = stack.pop()
            path = os.path.join(base, *rel_dir.parts)
            try:
                with os.scandir(path) as it:
                    entries = list(it)
            except OSError as exc:
                self._unlisted.append({"path": path, "why": exc.strerror or type(exc).__name__})
                log.warning("%s: folder %r not listed (%s); its images are not in this run", self._name(), path, exc)
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    is_link = entry.is_symlink()
                    link_to_dir = is_link and entry.is_dir()
                except OSError:
                    is_dir = is_link = link_to_dir = False  # stat failed: listed as a file, its read records why
                if is_dir:
                    stack.append(rel_dir / entry.name)
                elif link_to_dir:
                    self._unlisted.append({"path": entry.path, "why": "folder symlink, not followed"})
                elif os.path.splitext(entry.name)[1].lower() in exts:
                    yield rel_dir, entry

    def _scan(self) -> Listing:
        import polars as pl

        self._unlisted = []
        real_root = self._real_root()
        # uid, label (first folder below the scanned folder, None for a loose file), size and mtime (change detection)
        rows = _ColumnChunks({"uid": pl.String, "label": pl.String, "size": pl.Int64, "token": pl.Int64}, self._name())
        escapes: list[str] = []
        for split in self._splits():
            base = os.path.join(self.root, split) if split else self.root
            split_prefix = "".join(part + "/" for part in Path(split).parts) if split else ""
            last_dir, prefix, label = None, "", None
            for rel_dir, entry in self._walk(base):
                if real_root is not None and entry.is_symlink() and not _inside(os.path.realpath(entry.path), real_root):
                    escapes.append(f"{entry.path!r} -> {os.path.realpath(entry.path)!r}")
                    continue
                if rel_dir is not last_dir:  # one folder's entries come together: its uid prefix is built once
                    last_dir, prefix = rel_dir, split_prefix + "".join(part + "/" for part in rel_dir.parts)
                    label = rel_dir.parts[0] if rel_dir.parts else None
                try:
                    st = entry.stat()  # follows symlinks, like the read; never opens the file (a FIFO cannot block)
                    size, token = st.st_size, st.st_mtime_ns
                except OSError:
                    size = token = -1  # gone or unreadable: the read records why
                rows.append(prefix + entry.name, label, size, token)
        if escapes:
            raise SourceError(
                f"{len(escapes)} symlink(s) under image folder root {self.root!r} resolve outside it: "
                f"{', '.join(escapes[:_SHOW_DUPLICATES])}{' ...' if len(escapes) > _SHOW_DUPLICATES else ''}; "
                "set follow_symlinks: true in the source to read them"
            )
        self._unlisted.sort(key=lambda d: d["path"])
        frame = rows.frame(rechunk=False).sort("uid")  # UTF-8 byte order = code point order: the order of sorted() on the strings
        loose = frame["label"].null_count()
        if self.labels_from_subfolders is None:
            with_labels = frame.height > 0 and loose == 0
        else:
            with_labels = self.labels_from_subfolders
            if with_labels and loose:
                first = frame.filter(pl.col("label").is_null())["uid"].head(_SHOW_DUPLICATES).to_list()
                raise SourceError(
                    f"labels_from_subfolders=True but {loose} image(s) are not inside a class folder "
                    f"under {self.root!r}: {', '.join(map(repr, first))}"
                )
        return Listing(frame if with_labels else frame.drop("label"), location_prefix=os.path.join(self.root, ""))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "root": self.root,
            "split": self.split,
            "labels_from_subfolders": self.labels_from_subfolders,
            "extensions": list(self.extensions),
            "follow_symlinks": self.follow_symlinks,
            "max_file_bytes": self.max_file_bytes,
        }

    def _name(self) -> str:
        return f"image folder {self.root!r}"


# ------------------------------------------------------------------------------------------------------ webdataset
# webdataset's own grouping rule (webdataset.tariterators.base_plus_ext): key = path up to the first dot of the
# file name, extension = the rest (lower-cased), so "a/b.seg.png" is key "a/b", extension "seg.png".
_WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_WDS_SKIP = re.compile(r"__[^/]*__($|/)")  # webdataset skips "__meta__"-style members


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace-expands each pattern (``shard-{000..009}.tar``) and keeps the order given."""
    import braceexpand

    patterns = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for pattern in patterns:
        out.extend(braceexpand.braceexpand(pattern))
    return out


class WebDatasetSource(Source):
    """Samples from webdataset tar shards (local paths or fsspec URLs, brace patterns allowed).

    uid = the webdataset ``__key__`` (member name up to the first dot of its file name); the image member is the
    first of ``image_keys`` a sample has (samples without one are skipped, with a logged count); label = the text of
    the ``label_key`` member, caption = that of ``caption_key``.
    ``refs()`` reads each tar's headers once; the listing holds each image member's data offset and size (tarfile's
    ``offset_data``), and a ref built from it carries them, so ``read_bytes`` seeks straight to the member, in worker
    processes too, without a per-member index. A ref made elsewhere (location only) is found by indexing its tar once.
    Only uncompressed tars can be read this way (``.tar.gz`` cannot be seeked): those are a SourceError, and so is a
    local shard that is not a regular file (a FIFO would block the listing). Members are never followed: an image member
    that is a link or device is a ref whose read fails with status not_regular_file, a member larger than
    ``max_file_bytes`` one whose read fails with too_large.
    """

    kind = "webdataset"

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        label_key: str | None = "cls",
        caption_key: str | None = "txt",
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        super().__init__()
        self.urls = [u if _is_url(u) else os.path.abspath(u) for u in expand_urls(urls)]
        if not self.urls:
            raise SourceError("WebDatasetSource needs at least one tar path or URL")
        self.max_file_bytes = check_max_file_bytes(max_file_bytes)
        keys = [image_keys] if isinstance(image_keys, str) else list(image_keys)
        self.image_keys = [k.lower() for k in keys]
        if not self.image_keys:
            raise SourceError("image_keys must not be empty")
        self.label_key = label_key.lower() if label_key else None
        self.caption_key = caption_key.lower() if caption_key else None
        # refs without a member hint: location ("<tar>::<member>") -> (data offset, size), per tar indexed on demand
        self._index: dict[str, tuple[int, int]] = {}
        self._indexed: set[str] = set()

    def _scan(self) -> Listing:
        import polars as pl

        frames = [self._scan_tar(url) for url in self.urls]
        return Listing(pl.concat(frames, rechunk=True) if frames else pl.DataFrame(schema=_wds_schema()))

    def _scan_tar(self, url: str, *, index: bool = False) -> pl.DataFrame:
        """One tar's samples as columns (uid, location, label, caption, size, offset); ``index``: also records every
        member's offset and size in self._index (for refs that come without them)."""
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        repeated: list[str] = []
        local = _local_path(url)
        if local is not None and os.path.exists(local) and not os.path.isfile(local):
            raise SourceError(f"webdataset shard {url!r} is {_file_kind(os.stat(local).st_mode)}, not a regular file")
        try:
            with _open_binary(url) as f:
                try:
                    # "r:" = uncompressed, random access: iterating reads headers and seeks past member data.
                    with tarfile.open(fileobj=f, mode="r:") as tar:
                        for info in tar:
                            if info.isdir() or _WDS_SKIP.match(info.name):
                                continue
                            m = _WDS_KEY.match(info.name)
                            if m is None:
                                continue
                            key, ext = m.group(1), m.group(2).lower()
                            members = samples.setdefault(key, {})
                            if ext in members:
                                repeated.append(info.name)
                            members[ext] = info
                            if index:  # a link or device member is listed (its row records why) but never read: offset -1
                                self._index[f"{url}::{info.name}"] = (info.offset_data if info.isreg() else -1, info.size)
                        frame = self._sample_frame(url, samples, tar)
                except tarfile.ReadError as e:
                    raise SourceError(f"{url!r} is not an uncompressed tar file ({e})") from e
        except FileNotFoundError as e:
            raise SourceError(f"webdataset shard {url!r} not found") from e
        if repeated:
            raise DuplicateUidError(
                f"webdataset shard {url!r}: {len(repeated)} member name(s) repeat a key and extension: "
                f"{', '.join(map(repr, repeated[:_SHOW_DUPLICATES]))}",
                [_WDS_KEY.match(n).group(1) for n in repeated[:_SHOW_DUPLICATES]],  # type: ignore[union-attr]
                len(repeated),
            )
        if index:
            self._indexed.add(url)
        return frame

    def _sample_frame(self, url: str, samples: dict[str, dict[str, tarfile.TarInfo]], tar: tarfile.TarFile) -> pl.DataFrame:
        rows = _ColumnChunks(_wds_schema(), f"webdataset shard {url!r}")
        skipped = 0
        for key, members in samples.items():  # tar order, as webdataset yields them
            image = next((members[k] for k in self.image_keys if k in members), None)
            if image is None:
                skipped += 1
                continue
            rows.append(
                key,
                f"{url}::{image.name}",
                self._text(tar, members.get(self.label_key)) if self.label_key else None,
                self._text(tar, members.get(self.caption_key)) if self.caption_key else None,
                image.size,
                image.offset_data if image.isreg() else -1,  # a link or device member is listed but never read
            )
        if skipped:
            log.warning("%s: %d sample(s) without any of %s skipped", url, skipped, self.image_keys)
        return rows.frame()

    @staticmethod
    def _text(tar: tarfile.TarFile, info: tarfile.TarInfo | None) -> str | None:
        if info is None or not info.isreg():
            return None
        f = tar.extractfile(info)
        assert f is not None  # regular file
        try:
            return f.read().decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise SourceError(f"member {info.name!r} of {tar.name!r} is not UTF-8 text ({e})") from e

    def read_bytes(self, ref: SampleRef) -> bytes:
        url, sep, member = ref.location.rpartition("::")
        if not sep or url not in self.urls:
            raise FileNotFoundError(f"{ref.location!r} is not a member location of this webdataset source")
        entry = ref.member if ref.member is not None else self._index.get(ref.location)
        if entry is None:
            if url not in self._indexed:
                self._scan_tar(url, index=True)  # a ref made elsewhere (location only): index this tar once
            entry = self._index.get(ref.location)
            if entry is None:
                raise FileNotFoundError(f"member {member!r} not found in {url!r}")
        offset, size = entry
        if offset < 0:
            raise NotRegularFileError(f"{ref.location!r} is a link or device member, not a regular file")
        if size > self.max_file_bytes:
            raise FileTooLargeError(f"{ref.location!r} has {size} bytes, more than max_file_bytes ({self.max_file_bytes})")
        with _open_binary(url) as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{ref.location!r}: expected {size} bytes, read {len(data)} (tar truncated?)")
        return data

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "urls": list(self.urls),
            "image_keys": list(self.image_keys),
            "label_key": self.label_key,
            "caption_key": self.caption_key,
            "max_file_bytes": self.max_file_bytes,
        }

    def _name(self) -> str:
        return f"webdataset ({len(self.urls)} shard(s), first {self.urls[0]!r})"


def _wds_schema() -> dict[str, Any]:
    import polars as pl

    return {"uid": pl.String, "location": pl.String, "label": pl.String, "caption": pl.String, "size": pl.Int64,
            "offset": pl.Int64}


# ----------------------------------------------------------------------------------------------------------- tables
def _read_table(path: str, columns: list[str]):
    """Reads ``columns`` of a Parquet or CSV file (by extension) as a pyarrow Table; SourceError on missing columns."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        available = pq.read_schema(path).names
        kind = "parquet"
    elif lower.endswith(".csv"):
        with pacsv.open_csv(path) as reader:
            available = reader.schema.names
        kind = "csv"
    else:
        raise SourceError(f"table {path!r}: expected a .parquet or .csv file")
    missing = [c for c in columns if c not in available]
    if missing:
        raise SourceError(f"table {path!r} has no column(s) {missing}; available: {available}")
    if kind == "parquet":
        return pq.read_table(path, columns=columns)
    # Read as strings: ids like "0001" must not become integers.
    opts = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns})
    return pacsv.read_csv(path, convert_options=opts)


def _column_as_str(table, name: str, path: str, *, allow_null: bool) -> list[str | None]:
    values = table.column(name).to_pylist()
    out: list[str | None] = []
    for i, v in enumerate(values):
        if v is None:
            if not allow_null:
                raise SourceError(f"table {path!r}: column {name!r} is null at row {i}")
            out.append(None)
        elif isinstance(v, bytes):
            out.append(v.decode("utf-8"))
        else:
            out.append(str(v))
    return out


def _check_nulls(values: list[Any], name: str, path: str, *, allow_null: bool) -> None:
    if not allow_null and None in values:
        raise SourceError(f"table {path!r}: column {name!r} is null at row {values.index(None)}")


def _column_as_series(table, name: str, path: str, *, allow_null: bool):
    """_column_as_str as a polars String Series; a string column goes over without a Python object per row."""
    import pyarrow as pa
    import polars as pl

    column = table.column(name)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return pl.Series(name, _column_as_str(table, name, path, allow_null=allow_null), dtype=pl.String)
    if not allow_null and column.null_count:
        _check_nulls(column.to_pylist(), name, path, allow_null=False)
    return pl.Series(name, column.combine_chunks() if column.num_chunks else column).cast(pl.String)


class TableSource(Source):
    """Images listed in a Parquet or CSV table (chosen by extension).

    uid = the ``uid_column`` value if given, else the path exactly as written in the table.
    Relative paths resolve against ``root`` (default: the table's folder); absolute paths and URLs are used as is.
    When ``root`` is given explicitly every path must stay inside it: ``..``, absolute paths elsewhere, URLs and
    symlinks pointing outside are a SourceError naming the path (symlinks are allowed with ``follow_symlinks``,
    the rest never). Reads are capped at ``max_file_bytes`` and refuse what is not a regular file, as for image folders.
    """

    kind = "table"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        path_column: str = "path",
        uid_column: str | None = None,
        label_column: str | None = None,
        caption_column: str | None = None,
        root: str | os.PathLike[str] | None = None,
        follow_symlinks: bool = False,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        text_embedding_column: str | None = None,
    ) -> None:
        super().__init__()
        self.path = os.path.abspath(os.fspath(path))
        self.text_embedding_column = text_embedding_column
        if not os.path.isfile(self.path):
            raise SourceError(f"table {self.path!r} not found (or not a regular file)")
        self.follow_symlinks = bool(follow_symlinks)
        self.max_file_bytes = check_max_file_bytes(max_file_bytes)
        self.path_column = path_column
        self.uid_column = uid_column
        self.label_column = label_column
        self.caption_column = caption_column
        self.root = None if root is None else os.path.abspath(os.fspath(root))
        if self.root is not None and not os.path.isdir(self.root):
            raise SourceError(f"table root {self.root!r} is not a directory")

    def _scan(self) -> Listing:
        import polars as pl

        wanted = [c for c in (self.path_column, self.uid_column, self.label_column, self.caption_column) if c]
        table = _read_table(self.path, list(dict.fromkeys(wanted)))
        paths = _column_as_series(table, self.path_column, self.path, allow_null=False)
        columns = {"uid": paths if self.uid_column is None else _column_as_series(table, self.uid_column, self.path, allow_null=False)}
        for name, column in (("label", self.label_column), ("caption", self.caption_column)):
            if column:
                columns[name] = _column_as_series(table, column, self.path, allow_null=True)
        del table
        base = self.root if self.root is not None else os.path.dirname(self.path)
        real_root = os.path.realpath(self.root) if self.root is not None else None
        if real_root is not None and self.follow_symlinks:
            real_root = os.path.normpath(self.root)  # paths are checked as written: `..` still cannot leave the root
        # paths resolved (and checked against the root) one chunk of Python strings at a time
        locations = [
            pl.Series("location", [self._resolve(p, base, real_root) for p in chunk.to_list()], dtype=pl.String)
            for chunk in (paths.slice(s, _CHUNK_ROWS) for s in range(0, len(paths), _CHUNK_ROWS))
        ]
        location = pl.concat(locations, rechunk=True) if locations else pl.Series("location", [], dtype=pl.String)
        frame = pl.DataFrame([s.alias(name) for name, s in columns.items()]).with_columns(location)
        return Listing(frame.select("uid", "location", *[c for c in ("label", "caption") if c in columns]))

    def _resolve(self, p: str, base: str, real_root: str | None) -> str:
        if real_root is None:
            return p if _is_url(p) or os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
        if _is_url(p):
            raise SourceError(f"table {self.path!r}: {p!r} is a URL, outside root {self.root!r}")
        location = os.path.normpath(os.path.join(base, p))
        # realpath resolves symlinks (in the file and its folders), so a link out of the root is caught too.
        real = location if self.follow_symlinks else os.path.realpath(location)
        if not _inside(real, real_root):
            hint = "" if self.follow_symlinks or real == location else "; set follow_symlinks: true to allow symlinks out of the root"
            raise SourceError(f"table {self.path!r}: path {p!r} escapes root {self.root!r} (resolves to {real!r}){hint}")
        return location

    def _real_root(self) -> str | None:
        return self._resolved_root() if self.root is not None and not self.follow_symlinks else None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "path_column": self.path_column,
            "uid_column": self.uid_column,
            "label_column": self.label_column,
            "caption_column": self.caption_column,
            "root": self.root,
            "follow_symlinks": self.follow_symlinks,
            "max_file_bytes": self.max_file_bytes,
        }

    def text_embedding_table(self) -> tuple[list[str], np.ndarray]:
        """The rows' uids and their caption embeddings from ``text_embedding_column`` (a Parquet column of float lists,
        one length throughout; a null list = no caption, a zero row). SourceError in one line when it does not fit."""
        import pyarrow as pa
        import pyarrow.compute as pc

        column = self.text_embedding_column
        if column is None:
            raise SourceError(f"table {self.path!r} has no text_embedding_column")
        if not self.path.lower().endswith((".parquet", ".pq")):
            raise SourceError(f"text_embedding_column needs a Parquet table (a column of float lists), got {self.path!r}")
        uid_column = self.uid_column or self.path_column
        table = _read_table(self.path, list(dict.fromkeys([uid_column, column])))
        uids = _column_as_str(table, uid_column, self.path, allow_null=False)
        values = table.column(column).combine_chunks()
        if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type)) \
                or not (pa.types.is_floating(values.type.value_type) or pa.types.is_integer(values.type.value_type)):
            raise SourceError(f"table {self.path!r} column {column!r} is {values.type}, expected a list of floats per row")
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        present = ~pc.is_null(values).to_numpy(zero_copy_only=False)
        dims = np.unique(lengths[present].astype(np.int64))
        if len(dims) != 1 or dims[0] == 0:
            raise SourceError(f"table {self.path!r} column {column!r}: text embeddings need one length in every row, "
                              f"found {dims[:5].tolist() or 'no rows'}")
        flat = pc.cast(pc.list_flatten(values), pa.float32()).to_numpy(zero_copy_only=False)
        emb = np.zeros((len(uids), int(dims[0])), dtype=np.float32)
        emb[present] = flat.reshape(-1, int(dims[0]))
        return [str(u) for u in uids], emb

    def _name(self) -> str:
        return f"table {self.path!r}"


# ------------------------------------------------------------------------------------------- precomputed embeddings
def _expand_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], what: str) -> list[str]:
    """Glob patterns or explicit paths → sorted absolute paths; SourceError when nothing matches."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[str] = []
    for item in items:
        s = os.fspath(item)
        if glob.has_magic(s):
            matches = glob.glob(s)
            if not matches:
                raise SourceError(f"{what} pattern {s!r} matches no file")
            odd = [m for m in matches if not os.path.isfile(m)]
            if odd:  # a FIFO would block np.load: name it instead
                raise SourceError(f"{what} pattern {s!r} matches {len(odd)} path(s) that are not regular files: {odd[:_SHOW_DUPLICATES]}")
            out.extend(matches)
        elif os.path.isfile(s):
            out.append(s)
        else:
            raise SourceError(f"{what} file {s!r} not found (or not a regular file)")
    return sorted(os.path.abspath(p) for p in dict.fromkeys(out))


class PrecomputedSource(Source):
    """Precomputed embeddings in the LAION/DataComp layout: ``img_emb/img_emb_0000.npy`` + row-aligned
    ``metadata/metadata_0000.parquet``, optionally + caption embeddings ``text_emb_paths`` (same dimension as the image
    embeddings: clip_score compares them): LAION ``text_emb/text_emb_0000.npy``, row-aligned with the image file, or
    DataComp's per-shard ``.npz`` beside the ``.parquet`` (array ``text_emb_key``, default: the one ``*_txt`` array of the
    image dimension, ``b32_txt`` / ``l14_txt``), whose rows are those of the same-named ``.parquet`` and are matched to
    the shard's rows by uid. Files pair up by sorted order.

    uid = the ``uid_column`` of the metadata (DataComp ``uid``, LAION ``key``); location = the
    ``location_column`` value when given (e.g. ``url``), else ``"<npy path>#<row>"``.
    There are no image bytes: use ``iter_shards`` instead of ``read_bytes``.
    """

    kind = "precomputed"
    has_images = False

    def __init__(
        self,
        emb_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        meta_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        uid_column: str = "key",
        label_column: str | None = None,
        caption_column: str | None = None,
        location_column: str | None = None,
        text_emb_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        text_emb_key: str | None = None,
    ) -> None:
        super().__init__()
        self.emb_paths = _expand_paths(emb_paths, "embedding")
        self.meta_paths = _expand_paths(meta_paths, "metadata")
        if len(self.emb_paths) != len(self.meta_paths):
            raise SourceError(
                f"{len(self.emb_paths)} embedding file(s) but {len(self.meta_paths)} metadata file(s); "
                f"they pair by sorted order (first: {self.emb_paths[:1]} / {self.meta_paths[:1]})"
            )
        self.text_emb_paths = _expand_paths(text_emb_paths, "text embedding") if text_emb_paths is not None else None
        if self.text_emb_paths is not None and len(self.text_emb_paths) != len(self.emb_paths):
            raise SourceError(
                f"{len(self.emb_paths)} embedding file(s) but {len(self.text_emb_paths)} text embedding file(s); "
                f"they pair by sorted order (first: {self.emb_paths[:1]} / {self.text_emb_paths[:1]})"
            )
        npz = [p.lower().endswith(".npz") for p in self.text_emb_paths or []]
        if any(npz) and not all(npz):
            raise SourceError("text_emb_paths mixes .npz and other files; use one layout (LAION .npy or DataComp .npz)")
        if text_emb_key is not None and not any(npz):
            raise SourceError("text_emb_key names an array of DataComp .npz text_emb_paths; these are not .npz files")
        self.text_emb_key = text_emb_key
        self.uid_column = uid_column
        self.label_column = label_column
        self.caption_column = caption_column
        self.location_column = location_column
        self._shard_sizes: list[int] = []  # rows per shard pair, filled by scan_shards
        self._has_labels = False

    def shard_frame(self, shard: int) -> pl.DataFrame:
        """One file pair's samples as string columns uid, location, label, caption (row counts checked, no null uid).

        Columns, not SampleRef objects: a store-copy task reads only its own file's metadata, and listing millions of
        rows costs bytes per row rather than one Python object each.
        """
        import polars as pl
        import pyarrow.parquet as pq

        emb_path, meta_path = self.emb_paths[shard], self.meta_paths[shard]
        emb = np.load(emb_path, mmap_mode="r")  # header only; the data stays on disk
        if emb.ndim != 2:
            raise SourceError(f"{emb_path!r}: expected a 2-d embedding array, got shape {emb.shape}")
        meta_rows = pq.ParquetFile(meta_path).metadata.num_rows
        if emb.shape[0] != meta_rows:
            raise SourceError(
                f"row count mismatch: {emb_path!r} has {emb.shape[0]} embeddings, {meta_path!r} has {meta_rows} rows"
            )
        if self.text_emb_paths is not None:
            self.check_text_embeddings(shard, image_shape=emb.shape)
        cols = [c for c in (self.uid_column, self.label_column, self.caption_column, self.location_column) if c]
        table = _read_table(meta_path, list(dict.fromkeys(cols)))

        def column(name: str | None, allow_null: bool) -> Any:
            return [None] * meta_rows if name is None else _column_as_series(table, name, meta_path, allow_null=allow_null)

        frame = pl.DataFrame(
            {
                "uid": column(self.uid_column, False),
                "location": column(self.location_column, True),
                "label": column(self.label_column, True),
                "caption": column(self.caption_column, True),
            },
            schema={"uid": pl.String, "location": pl.String, "label": pl.String, "caption": pl.String},
        )
        default_location = pl.format("{}#{}", pl.lit(emb_path), pl.int_range(pl.len()))
        return frame.with_columns(pl.col("location").fill_null(default_location))

    def _npz_layout(self, shard: int, shape: tuple[int, ...]) -> tuple[str, str]:
        """A DataComp .npz text file's array key (checked against the image dimension, from the headers only) and the
        parquet whose rows its rows are: the same-named ``.parquet`` beside it, else the shard's metadata file."""
        from pipeline.text_source import TextSourceError, choose_text_key, npz_shapes

        path = self.text_emb_paths[shard]  # type: ignore[index]
        try:
            key = choose_text_key(npz_shapes(path), int(shape[1]), key=self.text_emb_key, path=path)
        except TextSourceError as exc:
            raise SourceError(str(exc)) from None
        beside = os.path.splitext(path)[0] + ".parquet"
        rows_of = beside if os.path.isfile(beside) else self.meta_paths[shard]
        return key, rows_of

    def check_text_embeddings(self, shard: int, *, image_shape: tuple[int, ...] | None = None) -> None:
        """Checks one shard's caption-embedding file against its image file (rows, dimension) without reading the data;
        a SourceError in one line when it does not fit."""
        if self.text_emb_paths is None:
            return
        shape = image_shape or np.load(self.emb_paths[shard], mmap_mode="r").shape
        if not self.text_emb_paths[shard].lower().endswith(".npz"):
            self.text_embeddings(shard, image_shape=shape)  # memory-mapped: the header only
            return
        import pyarrow.parquet as pq

        from pipeline.text_source import npz_shapes

        path = self.text_emb_paths[shard]
        key, rows_of = self._npz_layout(shard, shape)  # the headers read and checked there
        rows, meta_rows = npz_shapes(path)[key][0], pq.ParquetFile(rows_of).metadata.num_rows
        if rows != meta_rows:
            raise SourceError(f"row count mismatch: {path!r}[{key}] has {rows} rows, {rows_of!r} has {meta_rows}")

    def text_embeddings(self, shard: int, *, image_shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        """One shard's caption embeddings, one row per image-file row (None without ``text_emb_paths``); a SourceError in
        one line when they do not fit. LAION .npy: memory-mapped, row-aligned. DataComp .npz: the chosen array, its rows
        matched to the shard's rows by uid (a shard row without one is a zero row, "no caption")."""
        if self.text_emb_paths is None:
            return None
        path = self.text_emb_paths[shard]
        shape = image_shape or np.load(self.emb_paths[shard], mmap_mode="r").shape
        if path.lower().endswith(".npz"):
            from pipeline.text_source import TextSourceError, align_by_uid

            self.check_text_embeddings(shard, image_shape=shape)
            key, rows_of = self._npz_layout(shard, shape)
            with np.load(path, allow_pickle=False) as z:
                text = z[key]
            if rows_of == self.meta_paths[shard]:
                return text  # the shard's own metadata: its rows are the image rows
            theirs = _column_as_str(_read_table(rows_of, [self.uid_column]), self.uid_column, rows_of, allow_null=False)
            ours = _column_as_str(_read_table(self.meta_paths[shard], [self.uid_column]), self.uid_column,
                                  self.meta_paths[shard], allow_null=False)
            try:
                return align_by_uid(ours, theirs, text, what=f"text embeddings {path!r} (uids from {rows_of!r})")
            except TextSourceError as exc:
                raise SourceError(str(exc)) from None
        text = np.load(path, mmap_mode="r")
        if text.ndim != 2:
            raise SourceError(f"{path!r}: expected a 2-d text embedding array, got shape {text.shape}")
        if text.shape[0] != shape[0]:
            raise SourceError(f"row count mismatch: {self.emb_paths[shard]!r} has {shape[0]} embeddings, {path!r} has {text.shape[0]}")
        if text.shape[1] != shape[1]:
            raise SourceError(f"text embeddings {path!r} have dim {text.shape[1]}, the image embeddings {shape[1]}: "
                              "clip_score needs both from one CLIP model")
        return text

    def _cache_name(self, shard: int) -> str:
        """The uid-hash cache name of one file pair (pipeline.uid_cache): its files' paths, sizes and mtimes."""
        from pipeline.uid_cache import entry_name

        paths = [self.emb_paths[shard], self.meta_paths[shard]]
        if self.text_emb_paths is not None:
            text = self.text_emb_paths[shard]
            beside = os.path.splitext(text)[0] + ".parquet"  # a DataComp .npz's rows are those of this file when present
            paths += [text, beside] if text.lower().endswith(".npz") and os.path.isfile(beside) else [text]
        return entry_name(paths, {"uid": self.uid_column, "label": self.label_column, "text_key": self.text_emb_key})

    def scan_shards(self, *, cache_dir: str | os.PathLike[str] | None = None) -> list[int]:
        """Validates every file pair and that uids are unique across all of them; returns the rows per pair.

        Holds one uid column at a time plus the uids' 64-bit hashes (8 bytes a row); only uids whose hash repeats
        are compared as strings. Cached, like refs().
        With ``cache_dir`` (pipeline.uid_cache), a file pair whose files have the paths, sizes and mtimes of an
        earlier successful scan is not read again; when that scan checked all such files unique together, only the new
        or changed files' uid hashes are looked up (binary search) in the sorted hashes it kept.
        """
        import polars as pl

        from pipeline.uid_cache import UidHashCache

        if self._shard_sizes:
            return list(self._shard_sizes)
        cache = UidHashCache(cache_dir)
        names: list[str] = []
        sizes: list[int] = []
        fresh: dict[int, np.ndarray] = {}  # sorted uid hashes of the file pairs read in this scan, by position
        labelled = False
        for shard in range(len(self.emb_paths)):
            name = self._cache_name(shard) if cache_dir is not None else ""
            entry = cache.lookup(name) if cache_dir is not None else None
            if entry is None:
                frame = self.shard_frame(shard)
                h = np.sort(frame["uid"].hash(seed=0).to_numpy())
                entry = {"rows": frame.height, "labelled": frame["label"].null_count() < frame.height}
                cache.add(name, h, **entry)
                fresh[shard] = h
            names.append(name)
            sizes.append(int(entry["rows"]))
            labelled = labelled or bool(entry["labelled"])

        def hashes(shard: int) -> np.ndarray:
            h = fresh.get(shard)
            if h is None:
                h = cache.hashes(names[shard])
            if h is None:  # a damaged cache entry: read the file again (and rewrite the entry)
                frame = self.shard_frame(shard)
                h = fresh[shard] = np.sort(frame["uid"].hash(seed=0).to_numpy())
                cache.add(names[shard], h, rows=frame.height, labelled=frame["label"].null_count() < frame.height)
            return h

        new = np.sort(np.concatenate(list(fresh.values()))) if fresh else np.empty(0, np.uint64)
        earlier = cache.checked(names) if cache_dir is not None else None
        if earlier is None:  # no earlier check to build on: every file's hashes
            parts = [hashes(shard) for shard in range(len(names))]
            checked = np.sort(np.concatenate(parts)) if parts else np.empty(0, np.uint64)
            repeated = np.unique(checked[1:][checked[1:] == checked[:-1]])
            write: np.ndarray | None = checked
        else:  # the earlier check's hashes (less those of files changed or gone), and the new files' looked up in them
            old, gone = earlier
            repeated = np.unique(new[1:][new[1:] == new[:-1]])
            if len(old) and len(new):
                pos = np.minimum(np.searchsorted(old, new), len(old) - 1)
                repeated = np.union1d(repeated, new[old[pos] == new])
            write = np.insert(old, np.searchsorted(old, new), new) if len(new) or gone else None
        if len(repeated):  # a repeated hash is a repeated uid or (rarely) a collision: compare those uids exactly
            suspects = []
            for shard in range(len(names)):
                if np.isin(repeated, hashes(shard)).any():
                    frame = self.shard_frame(shard)
                    suspects.append(frame.filter(pl.Series(np.isin(frame["uid"].hash(seed=0).to_numpy(), repeated)))["uid"])
            check_unique_uids(pl.concat(suspects).to_list())
        if cache_dir is not None:
            cache.commit(names, write)
        self._shard_sizes, self._has_labels = sizes, labelled
        return list(sizes)

    def has_labels(self) -> bool:
        """Whether any metadata row has a label (scan_shards() reads it)."""
        self.scan_shards()
        return self._has_labels

    def _scan(self) -> Listing:
        import polars as pl

        self.scan_shards()
        frames = [self.shard_frame(shard) for shard in range(len(self.emb_paths))]
        return Listing(pl.concat(frames, rechunk=True) if frames else pl.DataFrame(schema=dict.fromkeys(
            ("uid", "location", "label", "caption"), pl.String)))

    def shard_sizes(self) -> list[int]:
        """Rows per (embedding, metadata) file pair, in order (validated by scan_shards())."""
        return self.scan_shards()

    def iter_shards(self) -> Iterator[tuple[Listing, np.ndarray]]:
        """Yields (refs, float32 embeddings) per shard pair, after validating every pair and uid up front.

        float32 files come back memory-mapped (no copy); other dtypes are converted one shard at a time.
        """
        refs = self.refs()  # row counts and uid uniqueness across all shards are checked before any work starts
        start = 0
        for emb_path, n in zip(self.emb_paths, self._shard_sizes):
            emb = np.load(emb_path, mmap_mode="r")
            if emb.shape[0] != n:  # the file changed since refs() validated it
                raise SourceError(f"{emb_path!r} now has {emb.shape[0]} rows, expected {n}")
            vectors = emb if emb.dtype == np.float32 else np.asarray(emb, dtype=np.float32)
            yield refs[start : start + n], vectors
            start += n

    def read_bytes(self, ref: SampleRef) -> bytes:
        raise TypeError("PrecomputedSource holds embeddings, not image bytes; use iter_shards()")

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "emb_paths": list(self.emb_paths),
            "meta_paths": list(self.meta_paths),
            "uid_column": self.uid_column,
            "label_column": self.label_column,
            "caption_column": self.caption_column,
            "location_column": self.location_column,
            # only when given: stores made before text embeddings existed keep their description (store.json)
            **({"text_emb_paths": list(self.text_emb_paths)} if self.text_emb_paths is not None else {}),
            **({"text_emb_key": self.text_emb_key} if self.text_emb_key is not None else {}),
        }

    def _name(self) -> str:
        return f"precomputed embeddings ({len(self.emb_paths)} shard(s), first {self.emb_paths[0]!r})"


# ------------------------------------------------------------------------------------------------------------ config
SOURCE_KINDS: dict[str, type[Source]] = {
    cls.kind: cls for cls in (ImageFolderSource, WebDatasetSource, TableSource, PrecomputedSource)
}


def source_from_config(cfg: dict[str, Any]) -> Source:
    """Builds a source from ``{"kind": ..., **kwargs}`` (the shape ``describe()`` returns)."""
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise SourceError(f"source config must be a dict with a 'kind' key, got {cfg!r}")
    kwargs = dict(cfg)
    kind = kwargs.pop("kind")
    cls = SOURCE_KINDS.get(kind)
    if cls is None:
        raise SourceError(f"unknown source kind {kind!r}; known kinds: {sorted(SOURCE_KINDS)}")
    positional = {"image_folder": "root", "webdataset": "urls", "table": "path"}
    try:
        if kind == "precomputed":
            return cls(kwargs.pop("emb_paths"), kwargs.pop("meta_paths"), **kwargs)  # type: ignore[call-arg]
        return cls(kwargs.pop(positional[kind]), **kwargs)  # type: ignore[call-arg]
    except KeyError as e:
        raise SourceError(f"source kind {kind!r} needs {e.args[0]!r}") from e
    except TypeError as e:
        raise SourceError(f"bad options for source kind {kind!r}: {e}") from e
