"""The TUF repository builder: creation, targets, signing, rotation, loading, verification."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from securesystemslib.signer import Signature
from tuf.api.metadata import Metadata

from skylift.errors import UserInputError
from skylift.repodir import load_repository, save_repository
from skylift.trust.errors import (
    InsufficientSignaturesError,
    MetadataError,
    RepositoryError,
    SignatureThresholdError,
)
from skylift.trust.repository import (
    MAX_METADATA_BYTES,
    ROLE_EXPIRY_DEFAULTS,
    Repository,
    role_keys,
    verify_role_signatures,
    verify_threshold,
)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
CUSTOM = {"product": "camera", "version": "1.2.0", "hardware_ids": ["cam-r1", "cam-r2"]}


def make_repo(signers) -> Repository:
    return Repository.create(
        keys=signers.keys(), thresholds={"root": 2}, signers=signers.all, now=NOW
    )


def released(signers) -> Repository:
    """A repository with one released bundle, visible to clients (targets v2, snapshot v2)."""
    repo = make_repo(signers)
    repo.add_target_bytes("camera/cam-1.2.0.bundle", b"bundle bytes", custom=CUSTOM)
    repo.sign_targets(signers.targets, now=NOW)
    repo.refresh_online(signers.online, now=NOW)
    return repo


def parse(data: bytes) -> Metadata:
    return Metadata.from_bytes(data)


# Creation


def test_create_root_with_threshold_two_of_three(role_signers):
    repo = make_repo(role_signers)
    keys, threshold = repo.keys("root")
    assert threshold == 2
    assert {k.keyid for k in keys} == {s.public_key.keyid for s in role_signers.root}
    assert repo.versions == {"root": 1, "timestamp": 1, "snapshot": 1, "targets": 1}
    assert repo.root.signed.consistent_snapshot is True
    for role, period in ROLE_EXPIRY_DEFAULTS.items():
        md = getattr(repo, role)
        assert md.signed.expires == NOW + period
    files = repo.publish()
    assert sorted(files) == [
        "metadata/1.root.json",
        "metadata/1.snapshot.json",
        "metadata/1.targets.json",
        "metadata/root.json",
        "metadata/timestamp.json",
    ]
    assert files["metadata/root.json"] == files["metadata/1.root.json"]
    root_keys, root_threshold = role_keys(files["metadata/root.json"], "root")
    assert (len(root_keys), root_threshold) == (3, 2)
    # All three root keys signed, though two would have done.
    assert len(repo.root.signatures) == 3


@pytest.mark.parametrize(
    "drop",
    [
        lambda s: [*s.root[:1], *s.targets, *s.online],
        lambda s: [*s.root, *s.snapshot, *s.timestamp],
        lambda s: [*s.root, *s.targets, *s.timestamp],
        lambda s: [*s.root, *s.targets, *s.snapshot],
        lambda s: [],
    ],
    ids=["one-root-key", "no-targets-key", "no-snapshot-key", "no-timestamp-key", "nothing"],
)
def test_create_refuses_signers_below_a_threshold(role_signers, drop):
    with pytest.raises(InsufficientSignaturesError):
        Repository.create(
            keys=role_signers.keys(),
            thresholds={"root": 2},
            signers=drop(role_signers),
            now=NOW,
        )


@pytest.mark.parametrize(
    ("keys", "thresholds", "now"),
    [
        (lambda s: {k: v for k, v in s.keys().items() if k != "timestamp"}, None, NOW),
        (lambda s: s.keys(), {"root": 4}, NOW),
        (lambda s: s.keys(), {"root": 0}, NOW),
        (lambda s: s.keys(), {"mirror": 1}, NOW),
        (lambda s: {**s.keys(), "targets": []}, None, NOW),
        (lambda s: {**s.keys(), "root": s.keys()["root"][:1] * 2}, None, NOW),
        (lambda s: s.keys(), None, NOW.replace(tzinfo=None)),
    ],
    ids=[
        "missing-role",
        "threshold-above-keys",
        "threshold-zero",
        "unknown-role",
        "role-without-keys",
        "duplicate-key",
        "naive-clock",
    ],
)
def test_create_refuses_bad_configuration(role_signers, keys, thresholds, now):
    with pytest.raises(RepositoryError) as info:
        Repository.create(
            keys=keys(role_signers), thresholds=thresholds, signers=role_signers.all, now=now
        )
    assert not isinstance(info.value, InsufficientSignaturesError)


# Targets


def test_targets_with_custom_fields_appear_in_targets_metadata(role_signers):
    repo = make_repo(role_signers)
    content = b"bundle bytes"
    repo.add_target_bytes("camera/cam-1.2.0.bundle", content, custom=CUSTOM)
    other_hash = hashlib.sha256(b"elsewhere").hexdigest()
    repo.add_target(
        "camera/cam-1.1.0.bundle",
        length=9,
        hashes={"sha256": other_hash},
        custom={**CUSTOM, "version": "1.1.0"},
    )
    repo.sign_targets(role_signers.targets, now=NOW)
    repo.refresh_online(role_signers.online, now=NOW)
    files = repo.publish()

    targets = parse(files["metadata/2.targets.json"]).signed
    new = targets.targets["camera/cam-1.2.0.bundle"]
    assert new.custom == CUSTOM
    assert new.length == len(content)
    assert new.hashes == {"sha256": hashlib.sha256(content).hexdigest()}
    assert targets.targets["camera/cam-1.1.0.bundle"].custom["version"] == "1.1.0"
    # Content is published hash-prefixed; the target added without content is not.
    sha = hashlib.sha256(content).hexdigest()
    assert files[f"targets/camera/{sha}.cam-1.2.0.bundle"] == content
    assert not any(other_hash in name for name in files)
    # The snapshot lists the new targets and the timestamp that snapshot, with hashes.
    snapshot = parse(files["metadata/2.snapshot.json"]).signed
    meta = snapshot.meta["targets.json"]
    assert meta.version == 2
    meta.verify_length_and_hashes(files["metadata/2.targets.json"])
    timestamp = parse(files["metadata/timestamp.json"]).signed
    timestamp.snapshot_meta.verify_length_and_hashes(files["metadata/2.snapshot.json"])


def test_custom_fields_are_copied_not_shared(role_signers):
    repo = make_repo(role_signers)
    custom = {"hardware_ids": ["a"]}
    repo.add_target_bytes("a.bundle", b"x", custom=custom)
    custom["hardware_ids"].append("b")
    assert repo.target_files["a.bundle"].custom == {"hardware_ids": ["a"]}


def test_remove_target(role_signers):
    repo = released(role_signers)
    repo.remove_target("camera/cam-1.2.0.bundle")
    assert repo.unsigned_changes
    repo.sign_targets(role_signers.targets, now=NOW)
    assert repo.targets.signed.targets == {}
    with pytest.raises(RepositoryError):
        repo.remove_target("camera/cam-1.2.0.bundle")


def test_pending_targets_are_published_but_not_listed(role_signers):
    repo = released(role_signers)
    repo.add_target_bytes("camera/cam-1.3.0.bundle", b"newer")
    repo.sign_targets(role_signers.targets, now=NOW)
    files = repo.publish()
    # Clients still see targets v2 until the hub refreshes snapshot and timestamp.
    assert parse(files["metadata/2.snapshot.json"]).signed.meta["targets.json"].version == 2
    assert {"metadata/2.targets.json", "metadata/3.targets.json"} <= set(files)
    repo.refresh_online(role_signers.online, now=NOW)
    files = repo.publish()
    assert parse(files["metadata/3.snapshot.json"]).signed.meta["targets.json"].version == 3
    assert "metadata/2.targets.json" not in files


def test_publish_refuses_unsigned_changes(role_signers):
    repo = make_repo(role_signers)
    repo.add_target_bytes("a.bundle", b"x")
    with pytest.raises(RepositoryError, match="unsigned"):
        repo.publish()


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/abs/bundle",
        "..",
        "a/../b",
        "a//b",
        "a/./b",
        "dir/",
        "a\\b",
        "a\nb",
        "a\x00b",
        "x" * 1025,
    ],
    ids=[
        "empty",
        "leading-slash",
        "dotdot",
        "dotdot-inside",
        "empty-segment",
        "dot-segment",
        "trailing-slash",
        "backslash",
        "newline",
        "nul",
        "too-long",
    ],
)
def test_bad_target_paths_are_refused(role_signers, path):
    repo = make_repo(role_signers)
    with pytest.raises(RepositoryError):
        repo.add_target_bytes(path, b"x")
    assert repo.target_files == {}
    assert not repo.unsigned_changes


@pytest.mark.parametrize(
    ("length", "hashes", "custom"),
    [
        (-1, {"sha256": "a" * 64}, None),
        (True, {"sha256": "a" * 64}, None),
        (1, {}, None),
        (1, {"sha512": "a" * 128}, None),
        (1, {"sha256": "A" * 64}, None),
        (1, {"sha256": "a" * 63}, None),
        (1, {"sha256": "a" * 64, "sha512": "not hex"}, None),
        (1, {"sha256": "a" * 64}, {"when": datetime(2030, 1, 1, tzinfo=UTC)}),
        (1, {"sha256": "a" * 64}, {"ratio": float("nan")}),
    ],
    ids=[
        "negative-length",
        "bool-length",
        "no-hashes",
        "no-sha256",
        "uppercase-hash",
        "short-hash",
        "other-hash-not-hex",
        "custom-not-json",
        "custom-nan",
    ],
)
def test_bad_target_descriptions_are_refused(role_signers, length, hashes, custom):
    repo = make_repo(role_signers)
    with pytest.raises(RepositoryError):
        repo.add_target("a.bundle", length=length, hashes=hashes, custom=custom)


# Signing and refreshing


@pytest.mark.parametrize("refreshes", [1, 3])
def test_refresh_online_bumps_versions_and_expiries(role_signers, refreshes):
    repo = make_repo(role_signers)
    later = NOW
    for _ in range(refreshes):
        later += timedelta(hours=6)
        repo.refresh_online(role_signers.online, now=later)
    assert repo.versions == {
        "root": 1,
        "targets": 1,
        "snapshot": 1 + refreshes,
        "timestamp": 1 + refreshes,
    }
    assert repo.timestamp.signed.expires == later + timedelta(days=1)
    assert repo.snapshot.signed.expires == later + timedelta(days=7)
    assert repo.timestamp.signed.snapshot_meta.version == 1 + refreshes
    files = repo.publish()
    assert f"metadata/{1 + refreshes}.snapshot.json" in files


def test_sign_targets_bumps_version_and_expiry(role_signers):
    repo = make_repo(role_signers)
    repo.set_expiry("targets", timedelta(days=30))
    repo.sign_targets(role_signers.targets, now=NOW)
    assert repo.targets.signed.version == 2
    assert repo.targets.signed.expires == NOW + timedelta(days=30)


@pytest.mark.parametrize(
    ("role", "delta"),
    [("targets", timedelta(0)), ("timestamp", timedelta(days=-1)), ("mirror", timedelta(1))],
    ids=["zero", "negative", "unknown-role"],
)
def test_set_expiry_refuses_nonsense(role_signers, role, delta):
    with pytest.raises(RepositoryError):
        make_repo(role_signers).set_expiry(role, delta)


def test_expiring_lists_roles_soonest_first(role_signers):
    repo = make_repo(role_signers)
    assert repo.expiring(NOW, timedelta(hours=1)) == []
    assert repo.expiring(NOW, timedelta(days=8)) == [
        ("timestamp", NOW + timedelta(days=1)),
        ("snapshot", NOW + timedelta(days=7)),
    ]
    assert [role for role, _ in repo.expiring(NOW + timedelta(days=400), timedelta(0))] == [
        "timestamp",
        "snapshot",
        "targets",
        "root",
    ]


# Atomicity: a refused change leaves everything as it was


def _rotate_root_with(pick):
    def act(repo, s, new):
        repo.rotate_keys("root", [k.public_key for k in new], 2, signers=pick(s, new), now=NOW)

    return act


@pytest.mark.parametrize(
    "act",
    [
        lambda repo, s, new: repo.sign_targets(s.online, now=NOW),
        lambda repo, s, new: repo.refresh_online(s.snapshot, now=NOW),
        lambda repo, s, new: repo.refresh_online(s.timestamp, now=NOW),
        _rotate_root_with(lambda s, new: [*s.root, *new[:1]]),
        _rotate_root_with(lambda s, new: [*s.root[:1], *new]),
        _rotate_root_with(lambda s, new: new),
        lambda repo, s, new: repo.rotate_keys(
            "targets", [new[0].public_key], 1, signers=[new[0], *s.online], now=NOW
        ),
        lambda repo, s, new: repo.rotate_keys(
            "snapshot", [new[0].public_key], 1, signers=[*s.root, *s.timestamp], now=NOW
        ),
        lambda repo, s, new: repo.rotate_keys(
            "timestamp", [new[0].public_key], 1, signers=[*s.root, *s.timestamp], now=NOW
        ),
    ],
    ids=[
        "sign-targets-without-targets-key",
        "refresh-without-timestamp-key",
        "refresh-without-snapshot-key",
        "rotate-root-too-few-new-keys",
        "rotate-root-too-few-old-keys",
        "rotate-root-new-keys-only",
        "rotate-targets-without-root-keys",
        "rotate-snapshot-without-new-snapshot-key",
        "rotate-timestamp-signed-by-old-timestamp-key",
    ],
)
def test_insufficient_signers_leave_the_repository_unchanged(role_signers, new_signers, act):
    repo = released(role_signers)
    before = (repo.publish(), repo.versions, repo.keys("root"), repo.target_files)
    with pytest.raises(InsufficientSignaturesError):
        act(repo, role_signers, new_signers(3))
    assert (repo.publish(), repo.versions, repo.keys("root"), repo.target_files) == before


# Key rotation


def _verify_root_chain(files: dict[str, bytes], last: int) -> None:
    previous = None
    for version in range(1, last + 1):
        md = parse(files[f"metadata/{version}.root.json"])
        assert md.signed.version == version
        result = md.signed.get_root_verification_result(previous, md.signed_bytes, md.signatures)
        assert result.verified, version
        previous = md.signed


def test_rotate_root_needs_old_and_new_thresholds(role_signers, new_signers):
    repo = released(role_signers)
    new = new_signers(3)
    repo.rotate_keys(
        "root",
        [s.public_key for s in new],
        2,
        signers=[*role_signers.root[1:], *new[:2]],
        now=NOW,
    )
    files = repo.publish()
    assert {"metadata/1.root.json", "metadata/2.root.json"} <= set(files)
    assert files["metadata/root.json"] == files["metadata/2.root.json"]
    _verify_root_chain(files, 2)
    keys, threshold = role_keys(files["metadata/2.root.json"], "root")
    assert {k.keyid for k in keys} == {s.public_key.keyid for s in new}
    assert threshold == 2
    # Old root keys no longer trusted; other roles untouched.
    assert not set(parse(files["metadata/2.root.json"]).signed.keys) & {
        s.public_key.keyid for s in role_signers.root
    }
    assert repo.versions == {"root": 2, "targets": 2, "snapshot": 2, "timestamp": 2}


@pytest.mark.parametrize(
    ("role", "bumped"),
    [
        ("targets", {"root", "targets", "snapshot", "timestamp"}),
        ("snapshot", {"root", "snapshot", "timestamp"}),
        ("timestamp", {"root", "timestamp"}),
    ],
)
def test_rotate_a_non_root_role(role_signers, new_signers, role, bumped):
    repo = released(role_signers)
    before = repo.versions
    new = new_signers(2)
    others = [
        s
        for r in ("targets", "snapshot", "timestamp")
        if r != role
        for s in getattr(role_signers, r)
    ]
    repo.rotate_keys(
        role,
        [s.public_key for s in new],
        2,
        signers=[*role_signers.root[:2], *new, *others],
        now=NOW,
    )
    assert repo.versions == {r: v + (r in bumped) for r, v in before.items()}
    files = repo.publish()
    _verify_root_chain(files, 2)
    keys, threshold = role_keys(files["metadata/root.json"], role)
    assert ({k.keyid for k in keys}, threshold) == ({s.public_key.keyid for s in new}, 2)
    md = getattr(repo, role)
    assert set(md.signatures) == {s.public_key.keyid for s in new}
    # Whatever the client loads next verifies under the new root.
    reloaded = Repository.load(files)
    assert reloaded.versions == repo.versions
    assert reloaded.target_files == repo.target_files


def test_rotate_targets_refuses_unsigned_changes(role_signers, new_signers):
    repo = released(role_signers)
    repo.add_target_bytes("b.bundle", b"b")
    with pytest.raises(RepositoryError, match="unsigned"):
        repo.rotate_keys(
            "targets",
            [new_signers(1)[0].public_key],
            1,
            signers=role_signers.all,
            now=NOW,
        )


@pytest.mark.parametrize(
    ("keys", "threshold"),
    [(lambda new: [], 1), (lambda new: new, 3), (lambda new: new[:1] * 2, 1)],
    ids=["no-keys", "threshold-above-keys", "duplicate-key"],
)
def test_rotate_refuses_bad_keys(role_signers, new_signers, keys, threshold):
    repo = released(role_signers)
    new = [s.public_key for s in new_signers(2)]
    with pytest.raises(RepositoryError):
        repo.rotate_keys("root", keys(new), threshold, signers=role_signers.all, now=NOW)


# Loading


def test_load_of_publish_round_trips(role_signers, new_signers):
    repo = released(role_signers)
    new = new_signers(3)
    repo.rotate_keys(
        "root", [s.public_key for s in new], 2, signers=[*role_signers.root, *new], now=NOW
    )
    repo.add_target_bytes("camera/cam-1.3.0.bundle", b"pending", custom=CUSTOM)
    repo.sign_targets(role_signers.targets, now=NOW)
    files = repo.publish()

    loaded = Repository.load(files)
    assert loaded.publish() == files
    assert loaded.versions == repo.versions
    assert loaded.target_files == repo.target_files
    assert loaded.root == repo.root
    # The loaded copy can carry on where the original stopped.
    loaded.refresh_online(role_signers.online, now=NOW)
    assert loaded.snapshot.signed.meta["targets.json"].version == 3


def _drop(name):
    return lambda files, signers: {k: v for k, v in files.items() if k != name}


def _replace(name, make):
    """Replace file ``name`` by ``make(its bytes, all files, role signers)``."""
    return lambda files, signers: {**files, name: make(files[name], files, signers)}


def _resign(name, edit, signers_of):
    def make(data, files, signers):
        md = parse(data)
        edit(md.signed)
        md.signatures.clear()
        for signer in signers_of(signers):
            md.sign(signer, append=True)
        return md.to_bytes()

    return _replace(name, make)


def _bump_version(signed):
    signed.version += 1


def _extend_expiry(signed):
    signed.expires += timedelta(days=1)


def _pending(files, signers):
    """Targets v3, as a release engineer would stage it, signed by ``signers``."""
    md = parse(files["metadata/2.targets.json"])
    md.signed.version = 3
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    return md.to_bytes()


def _content_name(files):
    return next(k for k in files if k.startswith("targets/"))


@pytest.mark.parametrize(
    "corrupt",
    [
        _drop("metadata/root.json"),
        _drop("metadata/1.root.json"),
        _drop("metadata/timestamp.json"),
        _drop("metadata/2.snapshot.json"),
        _drop("metadata/2.targets.json"),
        _replace("metadata/timestamp.json", lambda d, f, s: b"{not json"),
        _replace("metadata/timestamp.json", lambda d, f, s: d + b" " * MAX_METADATA_BYTES),
        _replace("metadata/2.snapshot.json", lambda d, f, s: d.replace(b"targets", b"targetz")),
        _replace("metadata/2.targets.json", lambda d, f, s: d.replace(b"camera", b"kamera")),
        _replace("metadata/timestamp.json", lambda d, f, s: f["metadata/2.snapshot.json"]),
        _replace("metadata/root.json", lambda d, f, s: f["metadata/2.targets.json"]),
        _resign("metadata/timestamp.json", lambda signed: None, lambda s: s.snapshot),
        _resign("metadata/2.targets.json", _bump_version, lambda s: s.targets),
        _resign("metadata/1.root.json", lambda signed: None, lambda s: s.root[:1]),
        _resign("metadata/root.json", _extend_expiry, lambda s: s.root),
        _resign("metadata/2.snapshot.json", _extend_expiry, lambda s: s.snapshot),
        _resign("metadata/2.targets.json", _extend_expiry, lambda s: s.targets),
        lambda files, s: {**files, "metadata/7.targets.json": files["metadata/2.targets.json"]},
        lambda files, s: {**files, _content_name(files): b"bundle bytez"},
        lambda files, s: {**files, "metadata/3.targets.json": _pending(files, s.snapshot)},
        lambda files, s: {**files, "metadata/3.targets.json": _pending(files, s.targets)[:-2]},
    ],
    ids=[
        "no-root",
        "no-first-root",
        "no-timestamp",
        "no-snapshot",
        "no-targets",
        "timestamp-not-json",
        "timestamp-oversize",
        "snapshot-edited",
        "targets-edited",
        "snapshot-as-timestamp",
        "targets-as-root",
        "timestamp-signed-by-snapshot-key",
        "targets-version-not-as-listed",
        "root-below-threshold",
        "root-json-not-latest-versioned-root",
        "snapshot-not-as-hashed-in-timestamp",
        "targets-not-as-hashed-in-snapshot",
        "pending-targets-of-wrong-version",
        "tampered-target-content",
        "pending-targets-signed-by-snapshot-key",
        "pending-targets-truncated",
    ],
)
def test_load_refuses_broken_repositories(role_signers, corrupt):
    files = released(role_signers).publish()
    broken = corrupt(files, role_signers)
    assert broken != files
    with pytest.raises(RepositoryError):
        Repository.load(broken)


# Verifying against a pinned root


def _tamper(edit):
    def make(root_bytes):
        doc = json.loads(root_bytes)
        edit(doc)
        return json.dumps(doc).encode()

    return make


def _add_root_key(doc):
    doc["signed"]["keys"]["ab" * 32] = next(iter(doc["signed"]["keys"].values()))
    doc["signed"]["roles"]["targets"]["keyids"].append("ab" * 32)


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        (
            _tamper(lambda d: d["signed"].update(expires="2099-01-01T00:00:00Z")),
            SignatureThresholdError,
        ),
        (_tamper(_add_root_key), SignatureThresholdError),
        (_tamper(lambda d: d.update(signatures=d["signatures"][:1])), SignatureThresholdError),
        (_tamper(lambda d: d.update(signatures=[])), SignatureThresholdError),
        (
            _tamper(lambda d: d["signatures"][0].update(sig="00" * 64)),
            SignatureThresholdError,
        ),
        (lambda b: b[:-20], MetadataError),
        (lambda b: b"", MetadataError),
        (lambda b: b + b" " * MAX_METADATA_BYTES, MetadataError),
        (_tamper(lambda d: d["signed"].update(_type="targets")), MetadataError),
    ],
    ids=[
        "expiry-changed",
        "key-added",
        "one-signature-of-two",
        "no-signatures",
        "signature-zeroed",
        "truncated",
        "empty",
        "oversize",
        "wrong-type",
    ],
)
def test_role_keys_refuses_a_tampered_root(role_signers, tamper, error):
    repo = Repository.create(
        keys=role_signers.keys(),
        thresholds={"root": 2},
        signers=role_signers.root[:2] + role_signers.targets + role_signers.online,
        now=NOW,
    )
    root_bytes = repo.publish()["metadata/root.json"]
    assert role_keys(root_bytes, "targets")[1] == 1
    with pytest.raises(error):
        role_keys(tamper(root_bytes), "targets")


def test_role_keys_refuses_unknown_role(role_signers):
    root_bytes = make_repo(role_signers).publish()["metadata/root.json"]
    with pytest.raises(MetadataError, match="mirror"):
        role_keys(root_bytes, "mirror")


def test_verify_role_signatures_against_targets_keys(role_signers):
    root_bytes = make_repo(role_signers).publish()["metadata/root.json"]
    payload = b'{"bundle": "manifest"}'
    release = role_signers.targets[0]
    assert verify_role_signatures(root_bytes, "targets", payload, [release.sign(payload)]) == [
        release.public_key.keyid
    ]
    bad = [
        [],
        [role_signers.root[0].sign(payload)],
        [release.sign(payload + b" ")],
        [Signature(release.public_key.keyid, "00" * 64)],
    ]
    for signatures in bad:
        with pytest.raises(SignatureThresholdError):
            verify_role_signatures(root_bytes, "targets", payload, signatures)


def test_verify_threshold_counts_each_key_once(new_signers):
    signers = new_signers(2)
    payload = b"payload"
    keys = [s.public_key for s in signers]
    one = signers[0].sign(payload)
    with pytest.raises(SignatureThresholdError):
        verify_threshold(payload, [one, one], keys, 2)
    # One key listed under a second id must not count twice either.
    alias = signers[0].public_key.__class__(
        "cd" * 32, keys[0].keytype, keys[0].scheme, dict(keys[0].keyval)
    )
    with pytest.raises(SignatureThresholdError):
        verify_threshold(payload, [one, Signature(alias.keyid, one.signature)], [*keys, alias], 2)
    both = [one, signers[1].sign(payload)]
    assert sorted(verify_threshold(payload, both, keys, 2)) == sorted(k.keyid for k in keys)
    with pytest.raises(MetadataError):
        verify_threshold(payload, both, keys, 0)


# The repository on disk


def test_save_and_load_a_repository_directory(role_signers, tmp_path):
    repo = make_repo(role_signers)
    first = save_repository(tmp_path, repo)
    assert sorted(first) == sorted(repo.publish())
    assert first[-1] == "metadata/timestamp.json"

    repo.add_target_bytes("camera/cam-1.2.0.bundle", b"bundle bytes", custom=CUSTOM)
    repo.sign_targets(role_signers.targets, now=NOW)
    repo.refresh_online(role_signers.online, now=NOW)
    written = save_repository(tmp_path, repo)
    assert written[0].startswith("targets/camera/")
    assert written[-1] == "metadata/timestamp.json"
    assert sorted(written) == sorted(
        [
            written[0],
            "metadata/2.targets.json",
            "metadata/2.snapshot.json",
            "metadata/timestamp.json",
        ]
    )
    # Older versions stay for clients part-way through an update.
    assert (tmp_path / "metadata/1.snapshot.json").exists()
    assert (tmp_path / "metadata/1.targets.json").exists()

    loaded = load_repository(tmp_path)
    assert loaded.versions == repo.versions
    assert loaded.target_files == repo.target_files
    # Target contents stay on disk; loading reads metadata only.
    assert not any(name.startswith("targets/") for name in loaded.publish())
    assert save_repository(tmp_path, loaded) == []
    loaded.refresh_online(role_signers.online, now=NOW)
    assert sorted(save_repository(tmp_path, loaded)) == [
        "metadata/3.snapshot.json",
        "metadata/timestamp.json",
    ]


def test_save_refuses_to_change_a_published_version(role_signers, tmp_path):
    save_repository(tmp_path, make_repo(role_signers))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    other = make_repo(role_signers.__class__())
    with pytest.raises(RepositoryError, match="already published"):
        save_repository(tmp_path, other)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_load_repository_bounds_file_sizes(role_signers, tmp_path):
    save_repository(tmp_path, make_repo(role_signers))
    with open(tmp_path / "metadata/timestamp.json", "ab") as f:
        f.write(b" " * MAX_METADATA_BYTES)
    with pytest.raises(RepositoryError, match="larger"):
        load_repository(tmp_path)


def test_load_repository_needs_a_directory(tmp_path):
    with pytest.raises(UserInputError):
        load_repository(tmp_path / "missing")
    with pytest.raises(RepositoryError, match=r"root\.json is missing"):
        load_repository(tmp_path)


def test_create_from_roots_shares_the_root(role_signers):
    """Many repositories (the director's, one per device) trust one root."""
    first = make_repo(role_signers)
    roots = [first.publish()["metadata/1.root.json"]]
    online = [*role_signers.targets, *role_signers.online]
    a = Repository.create_from_roots(roots, signers=online, now=NOW)
    b = Repository.create_from_roots(roots, signers=online, now=NOW + timedelta(hours=1))
    assert a.publish()["metadata/root.json"] == b.publish()["metadata/root.json"] == roots[0]
    a.add_target("bundle.head", length=3, hashes={"sha256": "ab" * 32})
    a.sign_targets(role_signers.targets, now=NOW)
    a.refresh_online(role_signers.online, now=NOW)
    assert Repository.load(a.publish()).target_files.keys() == {"bundle.head"}
    assert Repository.load(b.publish()).target_files == {}


def test_create_from_roots_refuses_bad_roots_and_signers(role_signers):
    roots = [make_repo(role_signers).publish()["metadata/1.root.json"]]
    online = [*role_signers.targets, *role_signers.online]
    with pytest.raises(RepositoryError, match="no root"):
        Repository.create_from_roots([], signers=online, now=NOW)
    doc = json.loads(roots[0])
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
    with pytest.raises(RepositoryError, match="not signed by enough root keys"):
        Repository.create_from_roots([json.dumps(doc).encode()], signers=online, now=NOW)
    with pytest.raises(InsufficientSignaturesError):
        Repository.create_from_roots(roots, signers=role_signers.online, now=NOW)


def test_offline_root_and_targets_then_online_roles(role_signers):
    """Root and release keys sign offline; the hub's online keys sign snapshot and timestamp."""
    from skylift.trust.repository import offline_metadata

    offline = [*role_signers.root[:2], *role_signers.targets]
    root, targets = offline_metadata(
        keys=role_signers.keys(), thresholds={"root": 2}, signers=offline, now=NOW
    )
    with pytest.raises(InsufficientSignaturesError):
        offline_metadata(
            keys=role_signers.keys(), thresholds={"root": 2}, signers=role_signers.root[:1], now=NOW
        )
    repo = Repository.create_from_roots(
        [root], signers=role_signers.online, now=NOW, targets=targets
    )
    files = repo.publish()
    assert files["metadata/1.targets.json"] == targets
    assert Repository.load(files).versions["timestamp"] == 1
    # a targets document not signed by the release key is refused
    forged = json.loads(targets)
    forged["signed"]["expires"] = "2099-01-01T00:00:00Z"
    with pytest.raises(RepositoryError, match="valid signature"):
        Repository.create_from_roots(
            [root], signers=role_signers.online, now=NOW, targets=json.dumps(forged).encode()
        )


def test_sign_next_targets_adds_one_target_offline(role_signers):
    from skylift.trust.repository import sign_next_targets

    repo = make_repo(role_signers)
    files = repo.publish()
    new = sign_next_targets(
        files["metadata/1.targets.json"],
        path="2.0.0.head",
        content=b"head",
        custom={"version": "2.0.0"},
        signers=role_signers.targets,
        root=files["metadata/root.json"],
        now=NOW,
    )
    md = parse(new)
    assert md.signed.version == 2
    assert md.signed.targets["2.0.0.head"].custom == {"version": "2.0.0"}
    assert md.signed.targets["2.0.0.head"].hashes == {"sha256": hashlib.sha256(b"head").hexdigest()}
    staged = {**files, "metadata/2.targets.json": new}
    assert Repository.load(staged).versions["targets"] == 2  # pending, verified against root
    with pytest.raises(RepositoryError, match="exists already"):
        sign_next_targets(new, path="2.0.0.head", content=b"x", custom=None,
                          signers=role_signers.targets, root=files["metadata/root.json"], now=NOW)  # fmt: skip
    with pytest.raises(InsufficientSignaturesError):
        sign_next_targets(new, path="3.0.0.head", content=b"x", custom=None,
                          signers=role_signers.online, root=files["metadata/root.json"], now=NOW)  # fmt: skip
