"""The hub's TUF repositories, kept in the object store (ADR 0003, ADR 0004).

- :class:`ImageRepositories`: one image repository per product under
  ``image/<product>/``. Root and targets are signed offline (security officer,
  release engineers); the hub signs only snapshot and timestamp.
- :class:`Director`: the director repository, one root shared by every
  device under ``director/root/`` and one repository per device under
  ``director/devices/<device-id>/``, all signed with the hub's online keys.

Both publish with :func:`skylift.repodir.publish_to`, so the same rules hold
as on disk: versioned files never change, and a client never sees a
reference to a file that is not there yet.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from securesystemslib.signer import Signer
from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization import DeserializationError

from skylift.errors import SkyliftError
from skylift.hub.storage import ObjectNotFoundError, ObjectStore, ObjectTooLargeError
from skylift.repodir import publish_to
from skylift.trust.errors import RepositoryError
from skylift.trust.repository import MAX_METADATA_BYTES, Repository, target_content_path

__all__ = [
    "MAX_HEAD_BYTES",
    "Director",
    "ImageRepositories",
    "ReleaseRejectedError",
    "UnknownRepositoryError",
    "repository_file",
]

#: A bundle head: preamble, manifest (<= 1 MiB), signatures, four hooks (<= 1 MiB each).
MAX_HEAD_BYTES = 6 * 1024 * 1024
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # as skylift.hub.ca issues them
_FILE = re.compile(r"(metadata/[A-Za-z0-9._-]{1,200}\.json|targets/[A-Za-z0-9._/-]{1,400})")
#: Re-sign timestamps this long before they expire (they last a day by default).
REFRESH_MARGIN = timedelta(hours=6)


class UnknownRepositoryError(SkyliftError):
    """There is no repository (product, device) by that name."""


class ReleaseRejectedError(SkyliftError):
    """New targets metadata for a product does not qualify as a release."""


def repository_file(rel: str) -> str:
    """Validate a file name a client asks for (``metadata/2.root.json``, ``targets/<h>.x``).

    Raises:
        UnknownRepositoryError: anything else (the gateway answers 404).
    """
    if not _FILE.fullmatch(rel) or ".." in rel.split("/"):
        raise UnknownRepositoryError(f"no repository file {rel[:80]!r}")
    return rel


class _StoreFiles(Mapping[str, bytes]):
    """A repository's files under ``prefix`` in the store, read when asked for."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self._store = store
        self._prefix = prefix

    def __getitem__(self, rel: str) -> bytes:
        limit = MAX_HEAD_BYTES if rel.startswith("targets/") else MAX_METADATA_BYTES
        try:
            return self._store.get(self._prefix + rel, max_bytes=limit)
        except ObjectNotFoundError:
            raise KeyError(rel) from None
        except ObjectTooLargeError as e:
            raise RepositoryError(f"{rel} is larger than {limit} bytes") from e

    def __iter__(self) -> Iterator[str]:
        start = len(self._prefix)
        return (k[start:] for k in self._store.iter_keys(self._prefix + "metadata/"))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _StoreSink:
    """:class:`skylift.repodir.RepositorySink` over an object-store prefix."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self._store = store
        self._prefix = prefix

    def read(self, rel: str, limit: int) -> bytes | None:
        key = self._prefix + rel
        try:
            size = self._store.size(key)
            return self._store.get_range(key, 0, min(size, limit + 1))
        except ObjectNotFoundError:
            return None

    def write(self, rel: str, data: bytes) -> None:
        self._store.put(self._prefix + rel, data)


def _check_name(name: str, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise UnknownRepositoryError(f"{what} {name[:80]!r} is not a valid name")
    return name


def _parse_targets(data: bytes) -> Targets:
    if len(data) > MAX_METADATA_BYTES:
        raise ReleaseRejectedError(f"targets metadata is larger than {MAX_METADATA_BYTES} bytes")
    try:
        md = Metadata[Targets].from_bytes(data)
    except DeserializationError as e:
        raise ReleaseRejectedError("targets metadata is not valid TUF targets JSON") from e
    if not isinstance(md.signed, Targets):
        raise ReleaseRejectedError("the metadata sent is not targets metadata")
    return md.signed


class _OnlineRepositories:
    """What the image repositories and the director share: a store, online keys, a clock."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        online: Sequence[Signer],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._online = list(online)
        self._clock = clock

    def _refresh(self, repo: Repository, sink: _StoreSink | _DeviceSink, margin: timedelta) -> bool:
        """Re-sign snapshot and timestamp if a role expires within ``margin``; True if done."""
        now = self._clock()
        if not repo.expiring(now, margin):
            return False
        repo.refresh_online(self._online, now=now)
        publish_to(sink, repo)
        return True


class ImageRepositories(_OnlineRepositories):
    """Per-product image repositories in ``store``; the hub holds only online keys."""

    def _prefix(self, product: str) -> str:
        return f"image/{_check_name(product, _NAME, 'product')}/"

    def exists(self, product: str) -> bool:
        """Whether ``product`` has an image repository."""
        return self._store.exists(self._prefix(product) + "metadata/root.json")

    def create(self, product: str, *, root: bytes, targets: bytes) -> Repository:
        """Start ``product``'s repository from its offline-signed root and first targets.

        Raises:
            ReleaseRejectedError: the repository exists already.
            RepositoryError: the metadata does not verify, or its snapshot and
                timestamp roles are not the hub's online keys.
        """
        if self.exists(product):
            raise ReleaseRejectedError(f"product {product} has an image repository already")
        repo = Repository.create_from_roots(
            [root], signers=self._online, now=self._clock(), targets=targets
        )
        publish_to(_StoreSink(self._store, self._prefix(product)), repo)
        return repo

    def load(self, product: str) -> Repository:
        """The current repository of ``product``.

        Raises:
            UnknownRepositoryError: ``product`` has none.
            RepositoryError: what is stored does not verify.
        """
        if not self.exists(product):
            raise UnknownRepositoryError(f"product {product} has no image repository")
        return Repository.load(_StoreFiles(self._store, self._prefix(product)))

    def read(self, product: str, rel: str) -> bytes:
        """A published file, for the gateway to serve.

        Raises:
            UnknownRepositoryError: no such product or file.
        """
        limit = MAX_HEAD_BYTES if rel.startswith("targets/") else MAX_METADATA_BYTES
        try:
            return self._store.get(self._prefix(product) + repository_file(rel), max_bytes=limit)
        except ObjectNotFoundError as e:
            raise UnknownRepositoryError(f"{product}: no file {rel}") from e

    def add_release(self, product: str, *, targets: bytes, head: bytes) -> TargetFile:
        """Publish a release: targets metadata signed offline, adding one target for ``head``.

        The new targets must be the next version, signed by the product's
        targets threshold (checked against its root), keep every earlier
        target unchanged, and add exactly one target whose length and hashes
        are those of ``head``.

        Raises:
            ReleaseRejectedError: any of that does not hold (nothing changes).
            UnknownRepositoryError: ``product`` has no repository.
        """
        repo, target = self._stage_release(product, targets=targets, head=head)
        repo.refresh_online(self._online, now=self._clock())
        publish_to(_StoreSink(self._store, self._prefix(product)), repo)
        return target

    def check_release(self, product: str, *, targets: bytes, head: bytes) -> TargetFile:
        """What :meth:`add_release` would publish, checked the same way, writing nothing.

        For callers that must refuse a release before they store anything
        else for it (the release's chunk packs).

        Raises:
            ReleaseRejectedError: :meth:`add_release` would refuse it.
            UnknownRepositoryError: ``product`` has no repository.
        """
        return self._stage_release(product, targets=targets, head=head)[1]

    def _stage_release(
        self, product: str, *, targets: bytes, head: bytes
    ) -> tuple[Repository, TargetFile]:
        current = self.load(product)
        new = _parse_targets(targets)
        version = current.versions["targets"]
        if new.version != version + 1:
            raise ReleaseRejectedError(
                f"targets version {new.version} does not follow the current {version}",
                hint="fetch the current targets again; someone may have released meanwhile",
            )
        old = current.target_files
        for path, target in old.items():
            if new.targets.get(path) != target:
                raise ReleaseRejectedError(f"the new targets change or remove {path}")
        added = [t for p, t in new.targets.items() if p not in old]
        if len(added) != 1:
            raise ReleaseRejectedError(f"a release adds exactly one target, not {len(added)}")
        target = added[0]
        try:
            target.verify_length_and_hashes(head)
        except LengthOrHashMismatchError as e:
            raise ReleaseRejectedError(
                f"target {target.path} does not match the bundle head sent"
            ) from e
        files = _StoreFiles(self._store, self._prefix(product))
        staged = _Overlay(
            files,
            {
                f"metadata/{new.version}.targets.json": targets,
                target_content_path(target): head,
            },
        )
        try:
            # Verifies the new targets against the product's root (the release
            # keys' threshold) and the head against its target; it is pending.
            repo = Repository.load(staged)
        except RepositoryError as e:
            raise ReleaseRejectedError(f"release refused: {e.message}") from e
        if repo.versions["targets"] != new.version:
            raise ReleaseRejectedError("the new targets metadata was not accepted")
        return repo, target

    def refresh(self, product: str, *, margin: timedelta = REFRESH_MARGIN) -> bool:
        """Re-sign snapshot and timestamp if they expire within ``margin``; True if done."""
        return self._refresh(
            self.load(product), _StoreSink(self._store, self._prefix(product)), margin
        )


class _Overlay(Mapping[str, bytes]):
    def __init__(self, base: Mapping[str, bytes], extra: Mapping[str, bytes]) -> None:
        self._base = base
        self._extra = dict(extra)

    def __getitem__(self, key: str) -> bytes:
        if key in self._extra:
            return self._extra[key]
        return self._base[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._extra
        yield from (k for k in self._base if k not in self._extra)

    def __len__(self) -> int:
        return sum(1 for _ in self)


_ROOT_FILE = re.compile(r"metadata/(\d+\.)?root\.json")


class _DeviceFiles(Mapping[str, bytes]):
    """A device's director files: root versions from the shared root, the rest its own."""

    def __init__(self, store: ObjectStore, root_prefix: str, device_prefix: str) -> None:
        self._root = _StoreFiles(store, root_prefix)
        self._device = _StoreFiles(store, device_prefix)

    def __getitem__(self, rel: str) -> bytes:
        return (self._root if _ROOT_FILE.fullmatch(rel) else self._device)[rel]

    def __iter__(self) -> Iterator[str]:
        yield from (k for k in self._root if _ROOT_FILE.fullmatch(k))
        yield from (k for k in self._device if not _ROOT_FILE.fullmatch(k))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _DeviceSink:
    """Publishes a device's director repository; root files belong to the shared root."""

    def __init__(self, store: ObjectStore, root_prefix: str, device_prefix: str) -> None:
        self._root = _StoreSink(store, root_prefix)
        self._device = _StoreSink(store, device_prefix)

    def read(self, rel: str, limit: int) -> bytes | None:
        return (self._root if _ROOT_FILE.fullmatch(rel) else self._device).read(rel, limit)

    def write(self, rel: str, data: bytes) -> None:
        if _ROOT_FILE.fullmatch(rel):
            # Only Director.publish_root changes the shared root.
            raise RepositoryError(f"a device repository may not change the shared {rel}")
        self._device.write(rel, data)


class Director(_OnlineRepositories):
    """The director: what each device must install now, signed with online keys.

    One root (its key made by ``skylift hub init``) is shared by every device;
    each device has its own targets, snapshot and timestamp, naming at most
    one target with exactly the length, hashes and custom fields of the image
    repository's target (Uptane: both repositories must agree).
    """

    _ROOT_PREFIX = "director/root/"

    def _device_prefix(self, device_id: str) -> str:
        return f"director/devices/{_check_name(device_id, _DEVICE, 'device')}/"

    def publish_root(self, roots: Sequence[bytes]) -> None:
        """Publish the director root versions (1..N) every device repository shares.

        Raises:
            RepositoryError: they do not verify as a chain, or would change a
                published version.
        """
        repo = Repository.create_from_roots(roots, signers=self._online, now=self._clock())
        sink = _StoreSink(self._store, self._ROOT_PREFIX)
        for rel, data in sorted(repo.publish().items()):
            if _ROOT_FILE.fullmatch(rel):
                existing = sink.read(rel, len(data))
                if existing not in (None, data) and rel != "metadata/root.json":
                    raise RepositoryError(f"director {rel} is published with other content")
                if existing != data:
                    sink.write(rel, data)

    def roots(self) -> list[bytes]:
        """Every director root version, oldest first (what a device pins is version 1)."""
        files = _StoreFiles(self._store, self._ROOT_PREFIX)
        try:
            latest = Metadata.from_bytes(files["metadata/root.json"]).signed.version
        except KeyError as e:
            raise UnknownRepositoryError("the director has no root yet") from e
        return [files[f"metadata/{v}.root.json"] for v in range(1, latest + 1)]

    def _files(self, device_id: str) -> _DeviceFiles:
        return _DeviceFiles(self._store, self._ROOT_PREFIX, self._device_prefix(device_id))

    def _sink(self, device_id: str) -> _DeviceSink:
        return _DeviceSink(self._store, self._ROOT_PREFIX, self._device_prefix(device_id))

    def has_device(self, device_id: str) -> bool:
        """Whether ``device_id`` has a director repository."""
        return self._store.exists(self._device_prefix(device_id) + "metadata/timestamp.json")

    def _load_or_create(self, device_id: str) -> Repository:
        if self.has_device(device_id):
            return Repository.load(self._files(device_id))
        return Repository.create_from_roots(self.roots(), signers=self._online, now=self._clock())

    def ensure(self, device_id: str) -> None:
        """Give ``device_id`` an (empty) director repository if it has none (at enrollment)."""
        if not self.has_device(device_id):
            publish_to(self._sink(device_id), self._load_or_create(device_id))

    def assign(self, device_id: str, target: TargetFile | None) -> bool:
        """Make ``target`` the one thing ``device_id`` must install (None: nothing).

        Returns False when the device's director targets already say exactly that.

        Raises:
            UnknownRepositoryError: bad device id, or no director root.
            RepositoryError: the stored repository does not verify.
        """
        repo = self._load_or_create(device_id)
        wanted = {target.path: target.to_dict()} if target is not None else {}
        current = {p: t.to_dict() for p, t in repo.target_files.items()}
        if current == wanted and self.has_device(device_id):
            return False
        for path in list(repo.target_files):
            repo.remove_target(path)
        if target is not None:
            repo.add_target(
                target.path,
                length=target.length,
                hashes=target.hashes,
                custom=target.custom,
            )
        now = self._clock()
        repo.sign_targets(self._online, now=now)
        repo.refresh_online(self._online, now=now)
        publish_to(self._sink(device_id), repo)
        return True

    def assigned(self, device_id: str) -> TargetFile | None:
        """The target ``device_id`` is told to install now, if any."""
        if not self.has_device(device_id):
            return None
        targets = Repository.load(self._files(device_id)).target_files
        return next(iter(targets.values()), None)

    def read(self, device_id: str, rel: str) -> bytes:
        """A file of ``device_id``'s director repository, for the gateway to serve.

        Raises:
            UnknownRepositoryError: no such device repository or file.
        """
        try:
            return self._files(device_id)[repository_file(rel)]
        except KeyError as e:
            raise UnknownRepositoryError(f"director of {device_id}: no file {rel}") from e

    def refresh(self, device_id: str, *, margin: timedelta = REFRESH_MARGIN) -> bool:
        """Re-sign ``device_id``'s snapshot and timestamp if they expire within ``margin``."""
        return self._refresh(Repository.load(self._files(device_id)), self._sink(device_id), margin)
