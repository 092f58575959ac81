"""A TUF repository (root, targets, snapshot, timestamp), built and kept with python-tuf.

Pure: a :class:`Repository` lives in memory, is loaded from and published to a
mapping of relative paths to bytes, and reads the clock only through ``now``
parameters. Every version is frozen to bytes when it is signed, so the lengths
and hashes that snapshot and timestamp record are those of the bytes published.

The layout is TUF's consistent-snapshot layout, which any TUF client reads::

    metadata/1.root.json ... metadata/N.root.json   every root version
    metadata/root.json                              the latest root
    metadata/V.targets.json, metadata/V.snapshot.json
    metadata/timestamp.json
    targets/[dir/]SHA256.NAME                       target contents, hash-prefixed

The same module verifies payloads signed by a role of a pinned root
(:func:`role_keys`, :func:`verify_threshold`, :func:`verify_role_signatures`),
as a bundle manifest is signed by the targets (release) keys.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, TypeVar, cast

from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Key, Signature, Signer
from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.metadata import (
    TOP_LEVEL_ROLE_NAMES,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError, SerializationError

from skylift.trust.errors import (
    InsufficientSignaturesError,
    MetadataError,
    RepositoryError,
    SignatureThresholdError,
    TrustError,
)
from skylift.trust.keys import tuf_key_id

__all__ = [
    "MAX_METADATA_BYTES",
    "MAX_TARGET_PATH_CHARS",
    "ROLES",
    "ROLE_EXPIRY_DEFAULTS",
    "Repository",
    "offline_metadata",
    "role_keys",
    "sign_next_targets",
    "target_content_path",
    "verify_role_signatures",
    "verify_threshold",
]

#: The top-level roles, in the order a client loads them.
ROLES: tuple[str, ...] = ("root", "timestamp", "snapshot", "targets")

#: How long each role's metadata stays valid after it is signed. Timestamp and
#: snapshot are re-signed online by the hub; targets and root need offline keys,
#: so they live longer.
ROLE_EXPIRY_DEFAULTS: Mapping[str, timedelta] = MappingProxyType(
    {
        "root": timedelta(days=365),
        "targets": timedelta(days=90),
        "snapshot": timedelta(days=7),
        "timestamp": timedelta(days=1),
    }
)

#: No metadata file is read or written beyond this size: a client must not be
#: fed endless data, and a repository this large needs delegations we lack.
MAX_METADATA_BYTES = 1024 * 1024

#: Longest accepted target path.
MAX_TARGET_PATH_CHARS = 1024

_HASH_ALGORITHM = "sha256"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]+")
_VERSIONED_TARGETS = re.compile(r"metadata/([1-9][0-9]{0,17})\.targets\.json")

_S = TypeVar("_S", Root, Timestamp, Snapshot, Targets)


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise RepositoryError("the clock must be timezone-aware (UTC)")
    return now.astimezone(UTC)


def _check_role(role: str) -> None:
    if role not in TOP_LEVEL_ROLE_NAMES:
        raise RepositoryError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")


def _check_expiry(expiry: Mapping[str, timedelta] | None) -> dict[str, timedelta]:
    merged = dict(ROLE_EXPIRY_DEFAULTS)
    for role, delta in (expiry or {}).items():
        _check_role(role)
        if delta <= timedelta(0):
            raise RepositoryError(f"the expiry period of {role} must be positive")
        merged[role] = delta
    return merged


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parse(
    data: bytes, cls: type[_S], name: str, error: type[TrustError] = RepositoryError
) -> Metadata[_S]:
    """Deserialise ``data`` as metadata of type ``cls``; no signature is checked here."""
    if len(data) > MAX_METADATA_BYTES:
        raise error(f"{name} is larger than {MAX_METADATA_BYTES} bytes")
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except DeserializationError as e:
        raise error(f"{name} is not valid TUF metadata") from e
    if not isinstance(md.signed, cls):
        raise error(f"{name} holds {md.signed.type} metadata, expected {cls.type}")
    return cast("Metadata[_S]", md)


def _serialise(md: Metadata[Any], name: str) -> bytes:
    try:
        data = md.to_bytes()
    except SerializationError as e:
        raise RepositoryError(f"{name} cannot be serialised: {e}") from e
    if len(data) > MAX_METADATA_BYTES:
        # A client with the same bound would refuse it: better to fail here, before publishing.
        raise RepositoryError(f"{name} would be larger than {MAX_METADATA_BYTES} bytes")
    return data


def _check_keys(role: str, keys: Sequence[Key], threshold: int) -> None:
    if not keys:
        raise RepositoryError(f"role {role} needs at least one key")
    ids = [key.keyid for key in keys]
    if len(set(ids)) != len(ids):
        raise RepositoryError(f"role {role} lists the same key twice")
    for key in keys:
        if key.keyid != tuf_key_id(key):
            raise RepositoryError(f"a key of role {role} carries a key id that does not match it")
    if isinstance(threshold, bool) or not 1 <= threshold <= len(keys):
        raise RepositoryError(
            f"the threshold of {role} must be between 1 and its {len(keys)} key(s), not {threshold}"
        )


def _set_role_keys(root: Root, role: str, keys: Sequence[Key], threshold: int) -> None:
    for keyid in list(root.roles[role].keyids):
        root.revoke_key(keyid, role)
    for key in keys:
        root.add_key(key, role)
    root.roles[role].threshold = threshold


def _sign(md: Metadata[Any], signers: Sequence[Signer], keyids: Iterable[str]) -> None:
    """Sign ``md`` afresh with every signer whose key is among ``keyids``."""
    wanted = set(keyids)
    md.signatures.clear()
    for signer in signers:
        keyid = signer.public_key.keyid
        if keyid in wanted and keyid not in md.signatures:
            try:
                md.sign(signer, append=True)
            except UnsignedMetadataError as e:
                raise RepositoryError(f"signing {md.signed.type} failed: {e}") from e


def _sign_role(
    md: Metadata[Any], role: str, root: Root, signers: Sequence[Signer], name: str
) -> bytes:
    """Sign a non-root role as ``root`` delegates it; refuse below threshold."""
    _sign(md, signers, root.roles[role].keyids)
    result = root.get_verification_result(role, md.signed_bytes, md.signatures)
    if not result.verified:
        raise InsufficientSignaturesError(
            f"{role} needs {result.threshold} signature(s) from its keys;"
            f" the signers given provide {len(result.signed)}",
            hint=f"give the private key(s) of the {role} role",
        )
    return _serialise(md, name)


def _sign_root(
    md: Metadata[Root], previous: Root | None, signers: Sequence[Signer], name: str
) -> bytes:
    """Sign a root version: by its own threshold and by that of the previous version."""
    keyids = set(md.signed.roles["root"].keyids)
    if previous is not None:
        keyids |= set(previous.roles["root"].keyids)
    _sign(md, signers, keyids)
    result = md.signed.get_root_verification_result(previous, md.signed_bytes, md.signatures)
    if not result.verified:
        if previous is None:
            detail = (
                f"{result.second.threshold} signature(s) from its keys"
                f" (got {len(result.second.signed)})"
            )
        else:
            detail = (
                f"{result.first.threshold} signature(s) from the current root keys"
                f" (got {len(result.first.signed)}) and {result.second.threshold}"
                f" from the new root keys (got {len(result.second.signed)})"
            )
        raise InsufficientSignaturesError(
            f"root v{md.signed.version} needs {detail}",
            hint="give enough private keys of the root role",
        )
    return _serialise(md, name)


def _check_target_path(path: str) -> None:
    if not isinstance(path, str) or not path:
        raise RepositoryError("a target path must be a non-empty string")
    if len(path) > MAX_TARGET_PATH_CHARS:
        raise RepositoryError(f"target path is longer than {MAX_TARGET_PATH_CHARS} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path) or "\\" in path:
        raise RepositoryError(f"target path {path!r} has control characters or backslashes")
    if path.startswith("/"):
        raise RepositoryError(f"target path {path!r} must be relative (no leading '/')")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise RepositoryError(f"target path {path!r} has an empty, '.' or '..' segment")


def _check_hashes(path: str, hashes: Mapping[str, str]) -> dict[str, str]:
    sha = hashes.get(_HASH_ALGORITHM)
    if not isinstance(sha, str) or not _SHA256_HEX.fullmatch(sha):
        raise RepositoryError(f"target {path} needs a sha256 hash of 64 lowercase hex digits")
    for algorithm, value in hashes.items():
        if not isinstance(value, str) or not _HEX.fullmatch(value):
            raise RepositoryError(f"target {path}: hash {algorithm!r} is not lowercase hex")
    # Clients build the hash-prefixed file name from the first hash listed.
    return {_HASH_ALGORITHM: sha, **{a: v for a, v in hashes.items() if a != _HASH_ALGORITHM}}


def target_content_path(target: TargetFile) -> str:
    """Where a target's content is published: ``targets/<dir>/<sha256>.<name>``."""
    parent, sep, name = target.path.rpartition("/")
    return f"targets/{parent}{sep}{target.hashes[_HASH_ALGORITHM]}.{name}"


def _metafile(version: int, data: bytes) -> MetaFile:
    return MetaFile(version=version, length=len(data), hashes={_HASH_ALGORITHM: _sha256(data)})


def _get(files: Mapping[str, bytes], name: str) -> bytes:
    data = files.get(name)
    if data is None:
        raise RepositoryError(f"{name} is missing")
    if not isinstance(data, bytes):
        raise RepositoryError(f"{name} is not bytes")
    return data


def _verify_loaded(md: Metadata[Any], role: str, root: Root, name: str) -> None:
    result = root.get_verification_result(role, md.signed_bytes, md.signatures)
    if not result.verified:
        raise RepositoryError(
            f"{name} has {len(result.signed)} valid signature(s) from the {role} keys;"
            f" {result.threshold} needed"
        )


def _check_meta(meta: MetaFile, data: bytes, name: str) -> None:
    try:
        meta.verify_length_and_hashes(data)
    except LengthOrHashMismatchError as e:
        raise RepositoryError(f"{name} does not match the length and hashes listed for it") from e


class Repository:
    """An image repository: root, targets, snapshot and timestamp, with their history.

    Build one with :meth:`create` or :meth:`load`; change it with the methods
    below, each of which either completes or leaves the repository as it was.
    Target changes stay pending until :meth:`sign_targets`; clients see them
    after :meth:`refresh_online`.
    """

    def __init__(
        self,
        *,
        roots: Sequence[bytes],
        listed_targets: bytes,
        targets: bytes,
        snapshot: bytes,
        timestamp: bytes,
        contents: Mapping[str, bytes],
        expiry: Mapping[str, timedelta],
    ) -> None:
        """Assemble a repository from verified bytes; use :meth:`create` or :meth:`load`."""
        self._roots = list(roots)
        self._listed_targets = listed_targets
        self._targets = targets
        self._snapshot = snapshot
        self._timestamp = timestamp
        self._contents = dict(contents)
        self._expiry = dict(expiry)
        self._parse_state()

    def _parse_state(self) -> None:
        self._root_md = _parse(self._roots[-1], Root, "root")
        self._targets_md = _parse(self._targets, Targets, "targets")
        self._snapshot_md = _parse(self._snapshot, Snapshot, "snapshot")
        self._timestamp_md = _parse(self._timestamp, Timestamp, "timestamp")
        self._working = copy.deepcopy(self._targets_md.signed.targets)
        self._unsigned_changes = False

    # Construction

    @classmethod
    def create(
        cls,
        *,
        keys: Mapping[str, Sequence[Key]],
        thresholds: Mapping[str, int] | None,
        signers: Sequence[Signer],
        now: datetime,
        expiry: Mapping[str, timedelta] | None = None,
    ) -> Repository:
        """A new repository: version 1 of every role, no targets, consistent snapshots.

        ``keys`` names the keys of each of the four roles; ``thresholds``
        defaults to 1 per role. ``signers`` must meet every role's threshold.

        Raises:
            RepositoryError: a role is missing, a threshold or key is unusable.
            InsufficientSignaturesError: the signers do not meet a role's threshold.
        """
        now = _utc(now)
        periods = _check_expiry(expiry)
        root_bytes, targets_bytes = offline_metadata(
            keys=keys, thresholds=thresholds, signers=signers, now=now, expiry=periods
        )
        root = _parse(root_bytes, Root, "root").signed
        snapshot_bytes, timestamp_bytes = _online_pair(
            root, targets_bytes, 1, 1, signers, now, periods
        )
        return cls(
            roots=[root_bytes],
            listed_targets=targets_bytes,
            targets=targets_bytes,
            snapshot=snapshot_bytes,
            timestamp=timestamp_bytes,
            contents={},
            expiry=periods,
        )

    @classmethod
    def create_from_roots(
        cls,
        roots: Sequence[bytes],
        *,
        signers: Sequence[Signer],
        now: datetime,
        expiry: Mapping[str, timedelta] | None = None,
        targets: bytes | None = None,
    ) -> Repository:
        """A new repository on existing root metadata (versions 1..N).

        Two uses: many repositories that trust one root (the director's, one
        per device), each with its own empty targets signed by ``signers``;
        and an image repository whose root and first targets were signed
        offline (:func:`offline_metadata`) and are given here, so that the
        online ``signers`` only sign snapshot and timestamp.

        Raises:
            RepositoryError: the roots do not form a verified chain, use no
                consistent snapshots, or ``targets`` is not version 1 signed by
                the root's targets threshold.
            InsufficientSignaturesError: the signers do not meet a threshold.
        """
        now = _utc(now)
        periods = _check_expiry(expiry)
        root = _verify_root_chain(roots)
        if targets is None:
            md = Metadata(Targets(version=1, expires=now + periods["targets"]))
            targets_bytes = _sign_role(md, "targets", root, signers, "metadata/1.targets.json")
        else:
            parsed = _parse(targets, Targets, "metadata/1.targets.json")
            _verify_loaded(parsed, "targets", root, "metadata/1.targets.json")
            if parsed.signed.version != 1:
                raise RepositoryError("the first targets metadata must be version 1")
            targets_bytes = targets
        snapshot_bytes, timestamp_bytes = _online_pair(
            root, targets_bytes, 1, 1, signers, now, periods
        )
        return cls(
            roots=list(roots),
            listed_targets=targets_bytes,
            targets=targets_bytes,
            snapshot=snapshot_bytes,
            timestamp=timestamp_bytes,
            contents={},
            expiry=periods,
        )

    @classmethod
    def load(
        cls, files: Mapping[str, bytes], *, expiry: Mapping[str, timedelta] | None = None
    ) -> Repository:
        """Load a repository from the mapping that :meth:`publish` returns.

        Every root version is checked against the one before it, and the live
        timestamp, snapshot and targets against the latest root, with the
        lengths and hashes that list them. Older versioned files are ignored;
        a newer signed targets version that snapshot does not list yet is kept
        as pending. ``targets/`` entries are kept when they match a listed
        target and ignored otherwise. Expiry is not checked, so that an expired
        repository can be loaded and refreshed. ``files`` is only read by key
        and iterated for names, so it may read files lazily.

        Raises:
            RepositoryError: a file is missing, oversized, malformed,
                inconsistent, or not signed as its root requires; or the
                repository uses delegations or no consistent snapshots.
        """
        periods = _check_expiry(expiry)
        latest = _parse(_get(files, "metadata/root.json"), Root, "metadata/root.json")
        roots = [
            _get(files, f"metadata/{version}.root.json")
            for version in range(1, latest.signed.version + 1)
        ]
        root = _verify_root_chain(roots)
        if _parse(roots[-1], Root, "root") != latest:
            raise RepositoryError("metadata/root.json differs from the latest versioned root")

        timestamp_bytes = _get(files, "metadata/timestamp.json")
        timestamp = _parse(timestamp_bytes, Timestamp, "metadata/timestamp.json")
        _verify_loaded(timestamp, "timestamp", root, "metadata/timestamp.json")

        snapshot_meta = timestamp.signed.snapshot_meta
        name = f"metadata/{snapshot_meta.version}.snapshot.json"
        snapshot_bytes = _get(files, name)
        _check_meta(snapshot_meta, snapshot_bytes, name)
        snapshot = _parse(snapshot_bytes, Snapshot, name)
        _verify_loaded(snapshot, "snapshot", root, name)
        if snapshot.signed.version != snapshot_meta.version:
            raise RepositoryError(f"{name} holds snapshot version {snapshot.signed.version}")
        if set(snapshot.signed.meta) != {"targets.json"}:
            raise RepositoryError("snapshot lists roles other than targets (delegations)")

        targets_meta = snapshot.signed.meta["targets.json"]
        listed_bytes = _load_targets(files, targets_meta.version, root)
        _check_meta(targets_meta, listed_bytes, f"metadata/{targets_meta.version}.targets.json")

        newest = max(
            (int(m.group(1)) for m in map(_VERSIONED_TARGETS.fullmatch, files) if m),
            default=targets_meta.version,
        )
        targets_bytes = listed_bytes
        if newest > targets_meta.version:
            targets_bytes = _load_targets(files, newest, root)

        contents: dict[str, bytes] = {}
        for data in {listed_bytes, targets_bytes}:
            for target in _parse(data, Targets, "targets").signed.targets.values():
                path = target_content_path(target)
                content = files.get(path)
                if content is None:
                    continue
                try:
                    target.verify_length_and_hashes(content)
                except LengthOrHashMismatchError as e:
                    raise RepositoryError(f"{path} does not match target {target.path}") from e
                contents[path] = content
        return cls(
            roots=roots,
            listed_targets=listed_bytes,
            targets=targets_bytes,
            snapshot=snapshot_bytes,
            timestamp=timestamp_bytes,
            contents=contents,
            expiry=periods,
        )

    # Inspection

    @property
    def root(self) -> Metadata[Root]:
        """The latest root (a copy)."""
        return copy.deepcopy(self._root_md)

    @property
    def targets(self) -> Metadata[Targets]:
        """The latest signed targets (a copy); pending changes are in :attr:`target_files`."""
        return copy.deepcopy(self._targets_md)

    @property
    def snapshot(self) -> Metadata[Snapshot]:
        """The current snapshot (a copy)."""
        return copy.deepcopy(self._snapshot_md)

    @property
    def timestamp(self) -> Metadata[Timestamp]:
        """The current timestamp (a copy)."""
        return copy.deepcopy(self._timestamp_md)

    @property
    def target_files(self) -> dict[str, TargetFile]:
        """Target path -> target, including changes not signed yet (a copy)."""
        return copy.deepcopy(self._working)

    @property
    def unsigned_changes(self) -> bool:
        """True when targets were added or removed since :meth:`sign_targets`."""
        return self._unsigned_changes

    @property
    def versions(self) -> dict[str, int]:
        """Role -> latest signed version."""
        return {
            "root": self._root_md.signed.version,
            "timestamp": self._timestamp_md.signed.version,
            "snapshot": self._snapshot_md.signed.version,
            "targets": self._targets_md.signed.version,
        }

    def keys(self, role: str) -> tuple[list[Key], int]:
        """The keys of ``role`` in the latest root, and its threshold.

        Raises:
            RepositoryError: ``role`` is not a top-level role.
        """
        _check_role(role)
        root = self._root_md.signed
        return [root.keys[k] for k in root.roles[role].keyids], root.roles[role].threshold

    def expiring(self, now: datetime, within: timedelta) -> list[tuple[str, datetime]]:
        """Roles whose latest metadata expires before ``now + within``, soonest first.

        Raises:
            RepositoryError: ``now`` is not timezone-aware.
        """
        horizon = _utc(now) + within
        expiries = [
            ("root", self._root_md.signed.expires),
            ("timestamp", self._timestamp_md.signed.expires),
            ("snapshot", self._snapshot_md.signed.expires),
            ("targets", self._targets_md.signed.expires),
        ]
        return sorted(
            ((role, when) for role, when in expiries if when <= horizon), key=lambda x: x[1]
        )

    # Targets

    def add_target(
        self,
        path: str,
        *,
        length: int,
        hashes: Mapping[str, str],
        custom: Mapping[str, Any] | None = None,
    ) -> TargetFile:
        """Add or replace the target at ``path``; pending until :meth:`sign_targets`.

        ``custom`` (for example product, version, hardware_ids) is published
        as the target's ``custom`` field and must be JSON.

        Raises:
            RepositoryError: the path, length, hashes or custom fields are unusable.
        """
        _check_target_path(path)
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise RepositoryError(f"target {path}: length must be a non-negative integer")
        checked = _check_hashes(path, hashes)
        fields: dict[str, Any] = {}
        if custom is not None:
            try:
                # The round trip also copies, so the caller's later edits do not leak in.
                fields["custom"] = json.loads(json.dumps(dict(custom), allow_nan=False))
            except (TypeError, ValueError) as e:
                raise RepositoryError(f"target {path}: custom fields must be JSON") from e
        target = TargetFile(length=length, hashes=checked, path=path, unrecognized_fields=fields)
        self._working[path] = target
        self._unsigned_changes = True
        return copy.deepcopy(target)

    def add_target_bytes(
        self, path: str, content: bytes, *, custom: Mapping[str, Any] | None = None
    ) -> TargetFile:
        """Add a target from its content, which :meth:`publish` then emits hash-prefixed.

        Raises:
            RepositoryError: as :meth:`add_target`.
        """
        target = self.add_target(
            path, length=len(content), hashes={_HASH_ALGORITHM: _sha256(content)}, custom=custom
        )
        self._contents[target_content_path(target)] = bytes(content)
        return target

    def remove_target(self, path: str) -> None:
        """Remove the target at ``path``; pending until :meth:`sign_targets`.

        Raises:
            RepositoryError: there is no such target.
        """
        if path not in self._working:
            raise RepositoryError(f"there is no target {path!r}")
        del self._working[path]
        self._unsigned_changes = True

    # Signing

    def sign_targets(self, signers: Sequence[Signer], *, now: datetime) -> None:
        """Sign the current target list as a new targets version (the release key's job).

        Clients see it after the next :meth:`refresh_online`.

        Raises:
            InsufficientSignaturesError: the signers do not meet the targets threshold.
            RepositoryError: ``now`` is not timezone-aware, or the metadata is too large.
        """
        now = _utc(now)
        md = copy.deepcopy(self._targets_md)
        md.signed.targets = copy.deepcopy(self._working)
        md.signed.version += 1
        md.signed.expires = now + self._expiry["targets"]
        name = f"metadata/{md.signed.version}.targets.json"
        data = _sign_role(md, "targets", self._root_md.signed, signers, name)
        self._targets = data
        self._targets_md = _parse(data, Targets, name)
        self._unsigned_changes = False

    def refresh_online(self, signers: Sequence[Signer], *, now: datetime) -> None:
        """New snapshot (listing the latest signed targets) and timestamp versions.

        Raises:
            InsufficientSignaturesError: the signers do not meet the snapshot or
                timestamp threshold.
            RepositoryError: ``now`` is not timezone-aware.
        """
        now = _utc(now)
        snapshot, timestamp = _online_pair(
            self._root_md.signed,
            self._targets,
            self._snapshot_md.signed.version + 1,
            self._timestamp_md.signed.version + 1,
            signers,
            now,
            self._expiry,
        )
        self._commit(targets=self._targets, snapshot=snapshot, timestamp=timestamp)

    def rotate_keys(
        self,
        role: str,
        new_keys: Sequence[Key],
        threshold: int,
        *,
        signers: Sequence[Signer],
        now: datetime,
    ) -> None:
        """Give ``role`` new keys and threshold in a new root version.

        The new root is signed by the root keys among ``signers``: for a root
        rotation, enough of the current root keys (current threshold) and
        enough of the new ones (new threshold), so that clients can follow it.
        For another role, that role is then re-signed with its new keys as a
        new version, and snapshot and timestamp are renewed as needed, so
        ``signers`` must also hold those keys.

        Raises:
            InsufficientSignaturesError: the signers do not meet a threshold;
                the repository is left unchanged.
            RepositoryError: unknown role, unusable keys or threshold, targets
                with unsigned changes, or ``now`` not timezone-aware.
        """
        now = _utc(now)
        _check_role(role)
        _check_keys(role, new_keys, threshold)
        if role == "targets" and self._unsigned_changes:
            raise RepositoryError(
                "targets has unsigned changes",
                hint="sign the targets or drop the changes before rotating the targets keys",
            )
        previous = self._root_md.signed
        md = copy.deepcopy(self._root_md)
        md.signed.version += 1
        md.signed.expires = now + self._expiry["root"]
        _set_role_keys(md.signed, role, new_keys, threshold)
        name = f"metadata/{md.signed.version}.root.json"
        root_bytes = _sign_root(md, previous, signers, name)
        root = md.signed

        targets = self._targets
        snapshot = self._snapshot
        timestamp = self._timestamp
        if role == "targets":
            tmd = copy.deepcopy(self._targets_md)
            tmd.signed.version += 1
            tmd.signed.expires = now + self._expiry["targets"]
            tname = f"metadata/{tmd.signed.version}.targets.json"
            targets = _sign_role(tmd, "targets", root, signers, tname)
        if role in ("targets", "snapshot"):
            snapshot, timestamp = _online_pair(
                root,
                targets,
                self._snapshot_md.signed.version + 1,
                self._timestamp_md.signed.version + 1,
                signers,
                now,
                self._expiry,
            )
        elif role == "timestamp":
            timestamp = _timestamp_for(
                root, snapshot, self._timestamp_md.signed.version + 1, signers, now, self._expiry
            )
        self._roots.append(root_bytes)
        self._root_md = _parse(root_bytes, Root, name)
        self._commit(targets=targets, snapshot=snapshot, timestamp=timestamp)

    def set_expiry(self, role: str, delta: timedelta) -> None:
        """Set how long ``role`` stays valid each time it is signed from now on.

        Raises:
            RepositoryError: unknown role, or ``delta`` not positive.
        """
        self._expiry.update(_check_expiry({role: delta}))

    def _commit(self, *, targets: bytes, snapshot: bytes, timestamp: bytes) -> None:
        if targets != self._targets:
            self._targets = targets
            self._targets_md = _parse(targets, Targets, "targets")
        if snapshot != self._snapshot:
            # A new snapshot always lists the latest signed targets.
            self._listed_targets = targets
        self._snapshot = snapshot
        self._snapshot_md = _parse(snapshot, Snapshot, "snapshot")
        self._timestamp = timestamp
        self._timestamp_md = _parse(timestamp, Timestamp, "timestamp")

    # Publishing

    def publish(self) -> dict[str, bytes]:
        """Relative path -> bytes of every file a client may fetch now.

        Every root version, the latest root as ``metadata/root.json``, the
        listed (and any newer pending) targets version, the current snapshot,
        ``metadata/timestamp.json``, and the contents of the targets added with
        :meth:`add_target_bytes` that a published targets version lists.

        Raises:
            RepositoryError: targets have unsigned changes.
        """
        if self._unsigned_changes:
            raise RepositoryError(
                "targets have unsigned changes", hint="sign the targets before publishing"
            )
        files = {f"metadata/{v}.root.json": data for v, data in enumerate(self._roots, 1)}
        files["metadata/root.json"] = self._roots[-1]
        published_targets = {self._listed_targets, self._targets}
        for data in published_targets:
            version = _parse(data, Targets, "targets").signed.version
            files[f"metadata/{version}.targets.json"] = data
            for target in _parse(data, Targets, "targets").signed.targets.values():
                path = target_content_path(target)
                if path in self._contents:
                    files[path] = self._contents[path]
        files[f"metadata/{self._snapshot_md.signed.version}.snapshot.json"] = self._snapshot
        files["metadata/timestamp.json"] = self._timestamp
        return files


def offline_metadata(
    *,
    keys: Mapping[str, Sequence[Key]],
    thresholds: Mapping[str, int] | None,
    signers: Sequence[Signer],
    now: datetime,
    expiry: Mapping[str, timedelta] | None = None,
) -> tuple[bytes, bytes]:
    """Root version 1 and an empty targets version 1 of a new repository.

    What the holders of the offline keys (root and release keys) sign on
    their own machines; the online keys then sign snapshot and timestamp
    (:meth:`Repository.create_from_roots` with ``targets``). ``signers`` must
    meet the root and targets thresholds only.

    Raises:
        RepositoryError: a role is missing, a threshold or key is unusable.
        InsufficientSignaturesError: the signers do not meet root or targets.
    """
    now = _utc(now)
    periods = _check_expiry(expiry)
    if set(keys) != TOP_LEVEL_ROLE_NAMES:
        raise RepositoryError(f"keys must be given for exactly the roles {', '.join(ROLES)}")
    limits = dict(thresholds or {})
    for role in limits:
        _check_role(role)
    root = Root(version=1, expires=now + periods["root"], consistent_snapshot=True)
    for role in ROLES:
        threshold = limits.get(role, 1)
        _check_keys(role, keys[role], threshold)
        _set_role_keys(root, role, keys[role], threshold)
    root_bytes = _sign_root(Metadata(root), None, signers, "metadata/1.root.json")
    targets = Metadata(Targets(version=1, expires=now + periods["targets"]))
    targets_bytes = _sign_role(targets, "targets", root, signers, "metadata/1.targets.json")
    return root_bytes, targets_bytes


def sign_next_targets(
    current: bytes,
    *,
    path: str,
    content: bytes,
    custom: Mapping[str, Any] | None,
    signers: Sequence[Signer],
    root: bytes,
    now: datetime,
    expiry: timedelta = ROLE_EXPIRY_DEFAULTS["targets"],
) -> bytes:
    """The next targets version: ``current`` plus a target for ``content``, signed offline.

    What a release engineer signs (``skylift release push``): the hub then
    lists it with its online keys. ``root`` is the repository's current root,
    whose targets role ``signers`` must satisfy.

    Raises:
        RepositoryError: ``current`` or ``root`` is malformed, ``path`` is invalid
            or already a target.
        InsufficientSignaturesError: the signers do not meet the targets threshold.
    """
    _check_target_path(path)
    md = _parse(current, Targets, "targets")
    root_md = _parse(root, Root, "root")
    if path in md.signed.targets:
        raise RepositoryError(f"target {path} exists already", hint="release a new version")
    md.signed.targets[path] = TargetFile(
        length=len(content),
        hashes={_HASH_ALGORITHM: _sha256(content)},
        path=path,
        unrecognized_fields={"custom": copy.deepcopy(dict(custom))} if custom else {},
    )
    md.signed.version += 1
    md.signed.expires = _utc(now) + expiry
    return _sign_role(
        md, "targets", root_md.signed, signers, f"metadata/{md.signed.version}.targets.json"
    )


def _verify_root_chain(roots: Sequence[bytes]) -> Root:
    """Check root versions 1..N, each signed as the one before it requires; return the last.

    Raises:
        RepositoryError: empty, out of order, malformed, insufficiently signed,
            or without consistent snapshots.
    """
    previous: Root | None = None
    for version, data in enumerate(roots, 1):
        name = f"metadata/{version}.root.json"
        md = _parse(data, Root, name)
        if md.signed.version != version:
            raise RepositoryError(f"{name} holds root version {md.signed.version}")
        try:
            result = md.signed.get_root_verification_result(
                previous, md.signed_bytes, md.signatures
            )
        except ValueError as e:
            raise RepositoryError(f"{name} cannot be verified: {e}") from e
        if not result.verified:
            raise RepositoryError(f"{name} is not signed by enough root keys")
        previous = md.signed
    if previous is None:
        raise RepositoryError("there is no root metadata")
    if not previous.consistent_snapshot:
        raise RepositoryError("only repositories with consistent snapshots are supported")
    return previous


def _load_targets(files: Mapping[str, bytes], version: int, root: Root) -> bytes:
    name = f"metadata/{version}.targets.json"
    data = _get(files, name)
    md = _parse(data, Targets, name)
    _verify_loaded(md, "targets", root, name)
    if md.signed.version != version:
        raise RepositoryError(f"{name} holds targets version {md.signed.version}")
    if md.signed.delegations is not None:
        raise RepositoryError(f"{name} delegates to other roles, which is not supported")
    for target in md.signed.targets.values():
        _check_target_path(target.path)
        _check_hashes(target.path, target.hashes)
    return data


def _timestamp_for(
    root: Root,
    snapshot: bytes,
    version: int,
    signers: Sequence[Signer],
    now: datetime,
    expiry: Mapping[str, timedelta],
) -> bytes:
    snapshot_version = _parse(snapshot, Snapshot, "snapshot").signed.version
    md = Metadata(
        Timestamp(
            version=version,
            expires=now + expiry["timestamp"],
            snapshot_meta=_metafile(snapshot_version, snapshot),
        )
    )
    return _sign_role(md, "timestamp", root, signers, "metadata/timestamp.json")


def _online_pair(
    root: Root,
    targets: bytes,
    snapshot_version: int,
    timestamp_version: int,
    signers: Sequence[Signer],
    now: datetime,
    expiry: Mapping[str, timedelta],
) -> tuple[bytes, bytes]:
    targets_version = _parse(targets, Targets, "targets").signed.version
    md = Metadata(
        Snapshot(
            version=snapshot_version,
            expires=now + expiry["snapshot"],
            meta={"targets.json": _metafile(targets_version, targets)},
        )
    )
    name = f"metadata/{snapshot_version}.snapshot.json"
    snapshot = _sign_role(md, "snapshot", root, signers, name)
    return snapshot, _timestamp_for(root, snapshot, timestamp_version, signers, now, expiry)


# Verifying payloads against a pinned root


def role_keys(root_bytes: bytes, role: str) -> tuple[list[Key], int]:
    """The keys and threshold of ``role`` in a root.json that verifies by its own root keys.

    Self-verification only proves the document is intact: trust comes from
    where ``root_bytes`` was pinned (the device image, a verified update).

    Raises:
        MetadataError: oversized, malformed, not root metadata, or ``role`` unknown.
        SignatureThresholdError: not signed by the threshold of its own root keys.
    """
    md = _parse(root_bytes, Root, "root metadata", MetadataError)
    root = md.signed
    result = root.get_verification_result("root", md.signed_bytes, md.signatures)
    if not result.verified:
        raise SignatureThresholdError(
            f"root metadata has {len(result.signed)} valid signature(s) from its root keys;"
            f" {result.threshold} needed"
        )
    if role not in root.roles:
        raise MetadataError(f"root metadata has no role {role!r}")
    try:
        keys = [root.get_key(keyid) for keyid in root.roles[role].keyids]
    except ValueError as e:
        raise MetadataError(f"root metadata lists a {role} key it does not define") from e
    return keys, root.roles[role].threshold


def verify_threshold(
    payload: bytes, signatures: Iterable[Signature], keys: Sequence[Key], threshold: int
) -> list[str]:
    """Check that ``threshold`` distinct ``keys`` signed ``payload``; return their key ids.

    Keys are told apart by their recomputed TUF key id, so one key listed
    under two ids counts once.

    Raises:
        SignatureThresholdError: fewer distinct valid signatures than ``threshold``.
        MetadataError: ``threshold`` is below 1.
    """
    if isinstance(threshold, bool) or threshold < 1:
        raise MetadataError(f"a signature threshold must be at least 1, not {threshold}")
    by_id = {key.keyid: key for key in keys}
    good: dict[str, str] = {}
    for signature in signatures:
        key = by_id.get(signature.keyid)
        if key is None:
            continue
        try:
            key.verify_signature(signature, payload)
        except UnverifiedSignatureError:
            continue
        good.setdefault(tuf_key_id(key), key.keyid)
    if len(good) < threshold:
        raise SignatureThresholdError(
            f"{len(good)} valid signature(s) from the expected keys; {threshold} needed"
        )
    return sorted(good.values())


def verify_role_signatures(
    root_bytes: bytes, role: str, payload: bytes, signatures: Iterable[Signature]
) -> list[str]:
    """Check ``payload`` is signed by the threshold of ``role``'s keys in a pinned root.json.

    Returns the key ids that signed.

    Raises:
        MetadataError: the root is unusable (see :func:`role_keys`).
        SignatureThresholdError: too few valid signatures, from the root or over ``payload``.
    """
    keys, threshold = role_keys(root_bytes, role)
    return verify_threshold(payload, signatures, keys, threshold)
