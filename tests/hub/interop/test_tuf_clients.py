"""Independent TUF clients read the hub's repositories: python-tuf's ngclient and tuf-js.

Both clients are pointed, over mutual TLS with an enrolled device's
certificate, at the product's image repository and at the device's director
repository (whose targets are fetched from the image repository, as Uptane
does), with the same assertions: a good download gives the right bytes and
walks the standard layout (``N.root.json`` until a 404, unversioned
``timestamp.json``, versioned snapshot and targets, hash-prefixed target
names); a tampered target and expired metadata are refused; a rotated root
is followed.

tuf-js runs in Node (tests/hub/interop/js/tuf_client.mjs, one JSON line out);
its node_modules come from ``npm ci``, which ``make test`` runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater

from skylift.hub.repositories import Director, ImageRepositories
from skylift.hub.storage import ObjectNotFoundError, ObjectStore
from skylift.repodir import publish_to
from skylift.trust.keys import generate_private_key, signer_for
from skylift.trust.repository import Repository, target_content_path

from ..gateway.conftest import Hub, MTLSFetcher
from .conftest import TARGET, DirectorRootKey, Scenario

JS_DIR = Path(__file__).parent / "js"
JS_CLIENT = JS_DIR / "tuf_client.mjs"
NODE_TIMEOUT_S = 60
CLIENTS = ("ngclient", "tuf-js")
REPOSITORIES = ("image", "director")


@dataclass(frozen=True)
class Outcome:
    """What a client did: ``ok`` and the target's sha256, or the error; and every fetch."""

    ok: bool
    sha256: str | None
    error: str | None
    root_version: int | None
    fetched: list[tuple[str, int | None]]  # (path under /device/v1, HTTP status)

    @property
    def error_class(self) -> str | None:
        return None if self.error is None else self.error.split(":", 1)[0]

    def status(self, path: str) -> int | None:
        """The status of the first fetch of ``path``; KeyError if it was not fetched."""
        for fetched, status in self.fetched:
            if fetched == path:
                return status
        raise KeyError(f"{path} was not fetched; fetched: {[p for p, _ in self.fetched]}")


@dataclass(frozen=True)
class Target:
    """Where a client is pointed: one of the two repositories of the scenario's device."""

    hub: Hub
    kind: str
    metadata_url: str
    targets_url: str
    trusted_root: bytes  # what the device pinned at enrollment (version 1)
    scenario: Scenario

    @property
    def metadata_path(self) -> str:
        return self.metadata_url.removeprefix(self.hub.url)

    def current_root_version(self) -> int:
        if self.kind == "image":
            data = self.hub.ctx.images.read(self.scenario.product, "metadata/root.json")
        else:
            data = self.hub.ctx.director.read(self.scenario.device.device_id, "metadata/root.json")
        return Metadata.from_bytes(data).signed.version

    def served(self, rel: str) -> dict[str, Any]:
        answer = self.hub.client(self.scenario.device).get(self.metadata_path + rel)
        assert answer.status_code == 200, answer.text
        doc: dict[str, Any] = answer.json()
        return doc


def _repository(scenario: Scenario, kind: str) -> Target:
    hub, device = scenario.hub, scenario.device
    if kind == "image":
        metadata_url = f"{hub.url}/image/metadata/"
        root = device.answer["image_root"]
    else:
        metadata_url = f"{hub.url}/director/{device.device_id}/metadata/"
        root = device.answer["director_root"]
    targets_url = f"{hub.url}/image/targets/"  # the director names them; the image repo has them
    return Target(hub, kind, metadata_url, targets_url, json.dumps(root).encode(), scenario)


# -- the two clients ------------------------------------------------------------------------------


class _RecordingFetcher(MTLSFetcher):
    """The gateway tests' mutual-TLS fetcher, keeping the status of every fetch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fetched: list[tuple[str, int | None]] = []

    def _fetch(self, url: str) -> Any:
        try:
            chunks = super()._fetch(url)
        except tuf_exceptions.DownloadHTTPError as e:
            self.fetched.append((url, e.status_code))
            raise
        self.fetched.append((url, 200))
        return chunks


def _root_version(metadata_dir: Path) -> int | None:
    try:
        version: int = json.loads((metadata_dir / "root.json").read_bytes())["signed"]["version"]
    except (OSError, ValueError, KeyError):
        return None
    return version


def _run_ngclient(target: Target, out: Path) -> Outcome:
    metadata_dir, target_dir = out / "metadata", out / "targets"
    metadata_dir.mkdir(parents=True)
    target_dir.mkdir()
    fetcher = _RecordingFetcher(target.hub.tls(target.scenario.device))
    sha256 = error = None
    try:
        updater = Updater(
            metadata_dir=str(metadata_dir),
            metadata_base_url=target.metadata_url,
            target_dir=str(target_dir),
            target_base_url=target.targets_url,
            fetcher=fetcher,
            bootstrap=target.trusted_root,
        )
        updater.refresh()
        info = updater.get_targetinfo(TARGET)
        if info is None:
            raise LookupError(f"no target {TARGET} in the repository")
        sha256 = hashlib.sha256(Path(updater.download_target(info)).read_bytes()).hexdigest()
    except Exception as e:  # the outcome is the error, as tuf-js reports it
        error = f"{type(e).__name__}: {e}"
    finally:
        fetcher.close()
    fetched = [(url.removeprefix(target.hub.url), status) for url, status in fetcher.fetched]
    return Outcome(error is None, sha256, error, _root_version(metadata_dir), fetched)


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node (Node.js 20.17 or newer) is not on PATH: the tuf-js interop tests need it",
            pytrace=False,
        )
    if not (JS_DIR / "node_modules" / "tuf-js" / "package.json").is_file():
        pytest.fail(
            "tests/hub/interop/js/node_modules is missing: run `make test` "
            "(it runs `npm ci --prefix tests/hub/interop/js`)",
            pytrace=False,
        )
    return node


def _run_tuf_js(target: Target, out: Path) -> Outcome:
    node = _node()
    out.mkdir(parents=True)
    (out / "root.json").write_bytes(target.trusted_root)
    (out / "ca.pem").write_bytes(target.hub.ca_pem)
    device = target.scenario.device
    args = [
        node, str(JS_CLIENT),
        "--metadata-url", target.metadata_url, "--targets-url", target.targets_url,
        "--root", str(out / "root.json"), "--target", TARGET, "--out", str(out / "client"),
        "--cert", str(device.cert), "--key", str(device.key), "--ca", str(out / "ca.pem"),
    ]  # fmt: skip
    try:
        run = subprocess.run(
            args, cwd=JS_DIR, capture_output=True, text=True, timeout=NODE_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"tuf-js client did not finish in {NODE_TIMEOUT_S} s: {e.stderr!r}")
    lines = run.stdout.strip().splitlines()
    try:
        doc = json.loads(lines[-1])
    except (IndexError, ValueError):
        pytest.fail(f"tuf-js client exited {run.returncode} without a JSON line: {run.stderr}")
    assert (run.returncode == 0) == doc["ok"], (run.returncode, doc, run.stderr)
    fetched = [(url.removeprefix(target.hub.url), status) for url, status in doc["fetched"]]
    return Outcome(doc["ok"], doc.get("sha256"), doc.get("error"), doc.get("root_version"), fetched)


_RUNNERS: dict[str, Callable[[Target, Path], Outcome]] = {
    "ngclient": _run_ngclient,
    "tuf-js": _run_tuf_js,
}


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "tuf-js":
        _node()  # fail at once, with the fix, if Node or the npm packages are missing
    return name


@pytest.fixture(params=REPOSITORIES)
def repo(request: pytest.FixtureRequest, scenario: Scenario) -> Target:
    return _repository(scenario, request.param)


class _Runs:
    def __init__(self, client: str, tmp_path: Path) -> None:
        self._runner = _RUNNERS[client]
        self._tmp = tmp_path
        self._count = 0

    def __call__(self, target: Target) -> Outcome:
        self._count += 1
        return self._runner(target, self._tmp / f"run-{self._count}")


@pytest.fixture
def run(client: str, tmp_path: Path) -> _Runs:
    """Run the parametrised client against a repository, in a fresh metadata directory."""
    return _Runs(client, tmp_path)


# -- what the tests change on the hub -------------------------------------------------------------


class _StoreSink:
    """A repository published under ``prefix`` in the hub's object store (as the hub does)."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self._store = store
        self._prefix = prefix

    def read(self, rel: str, limit: int) -> bytes | None:
        try:
            key = self._prefix + rel
            return self._store.get_range(key, 0, min(self._store.size(key), limit + 1))
        except ObjectNotFoundError:
            return None

    def write(self, rel: str, data: bytes) -> None:
        self._store.put(self._prefix + rel, data)


def _target_key(scenario: Scenario) -> str:
    """The object the gateway serves as ``/image/targets/<sha256>.1.0.0.head``."""
    return f"image/{scenario.product}/{target_content_path(scenario.target)}"


def _expire_online_metadata(target: Target) -> None:
    """Re-sign snapshot and timestamp through the hub's repository code on a clock 2 days late.

    The timestamp lasts a day: it is served already expired; the snapshot is
    still valid (a week), so the timestamp is what clients must refuse.
    """
    hub, scenario = target.hub, target.scenario
    late = datetime.now(UTC) - timedelta(days=2)
    online = hub.ctx.online_signers
    if target.kind == "image":
        images = ImageRepositories(hub.ctx.store, online=online, clock=lambda: late)
        assert images.refresh(scenario.product, margin=timedelta(days=400))
    else:
        director = Director(hub.ctx.store, online=online, clock=lambda: late)
        assert director.refresh(scenario.device.device_id, margin=timedelta(days=400))


def _heal(target: Target) -> None:
    """What the hub's own refresh does on the real clock."""
    hub, scenario = target.hub, target.scenario
    if target.kind == "image":
        assert hub.ctx.images.refresh(scenario.product)
    else:
        assert hub.ctx.director.refresh(scenario.device.device_id)


def _rotate_root(target: Target, director_key: DirectorRootKey) -> int:
    """Publish root N+1 with a new root key, signed by the old and the new; returns N+1."""
    hub, scenario = target.hub, target.scenario
    now = datetime.now(UTC)
    new: CryptoSigner = signer_for(generate_private_key())
    if target.kind == "image":
        repository = hub.ctx.images.load(scenario.product)
        repository.rotate_keys(
            "root", [new.public_key], 1, signers=[scenario.root_signer, new], now=now
        )
        publish_to(_StoreSink(hub.ctx.store, f"image/{scenario.product}/"), repository)
        scenario.root_signer = new
        return repository.versions["root"]
    # The director root is shared by every device of the hub: rotate it for all.
    roots = hub.ctx.director.roots()
    repository = Repository.create_from_roots(roots, signers=hub.ctx.online_signers, now=now)
    repository.rotate_keys("root", [new.public_key], 1, signers=[director_key.signer, new], now=now)
    version = repository.versions["root"]
    hub.ctx.director.publish_root([*roots, repository.publish()[f"metadata/{version}.root.json"]])
    director_key.signer = new
    return version


# -- the tests ------------------------------------------------------------------------------------


def test_downloads_the_target_through_the_standard_layout(
    repo: Target, run: _Runs, scenario: Scenario
) -> None:
    outcome = run(repo)
    assert outcome.ok, outcome.error
    assert outcome.sha256 == hashlib.sha256(scenario.head).hexdigest()
    version = repo.current_root_version()
    assert outcome.root_version == version
    meta = repo.metadata_path
    for v in range(2, version + 1):  # a rotated director root (other tests) is walked
        assert outcome.status(f"{meta}{v}.root.json") == 200
    assert outcome.status(f"{meta}{version + 1}.root.json") == 404  # not 500: "no newer root"
    assert outcome.status(f"{meta}timestamp.json") == 200  # unversioned
    timestamp = repo.served("timestamp.json")["signed"]
    snapshot_version = timestamp["meta"]["snapshot.json"]["version"]
    assert outcome.status(f"{meta}{snapshot_version}.snapshot.json") == 200
    snapshot = repo.served(f"{snapshot_version}.snapshot.json")["signed"]
    targets_version = snapshot["meta"]["targets.json"]["version"]
    assert outcome.status(f"{meta}{targets_version}.targets.json") == 200
    # Consistent snapshots: the target is fetched by its hash-prefixed name only.
    sha = scenario.target.hashes["sha256"]
    assert outcome.status(f"/image/targets/{sha}.{TARGET}") == 200
    assert [s for _, s in outcome.fetched].count(404) == 1, outcome.fetched
    bare = scenario.hub.client(scenario.device).get(f"/image/targets/{TARGET}")
    assert bare.status_code == 404


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        (lambda b: bytes([b[0] ^ 1]) + b[1:], "LengthOrHashMismatchError"),
        (lambda b: b + b"more", "DownloadLengthMismatchError"),
    ],
    ids=["bytes changed", "bytes appended"],
)
def test_refuses_a_tampered_target(
    repo: Target,
    run: _Runs,
    scenario: Scenario,
    tamper: Callable[[bytes], bytes],
    error: str,
) -> None:
    store = scenario.hub.ctx.store
    key = _target_key(scenario)
    assert store.get(key, max_bytes=len(scenario.head)) == scenario.head
    store.put(key, tamper(scenario.head))
    outcome = run(repo)
    assert not outcome.ok
    assert outcome.error_class == error, outcome.error
    sha = scenario.target.hashes["sha256"]
    assert outcome.status(f"/image/targets/{sha}.{TARGET}") == 200  # served, then refused
    store.put(key, scenario.head)
    assert run(repo).ok


def test_refuses_expired_metadata(repo: Target, run: _Runs) -> None:
    _expire_online_metadata(repo)
    timestamp = repo.served("timestamp.json")["signed"]
    assert datetime.fromisoformat(timestamp["expires"]) < datetime.now(UTC)
    outcome = run(repo)
    assert not outcome.ok
    assert outcome.error_class == "ExpiredMetadataError", outcome.error
    assert "timestamp" in (outcome.error or "")
    assert not any(path.startswith("/image/targets/") for path, _ in outcome.fetched)
    _heal(repo)
    assert run(repo).ok


def test_follows_a_rotated_root_and_stops_at_the_next_version(
    repo: Target, run: _Runs, scenario: Scenario, director_root_key: DirectorRootKey
) -> None:
    rotated = _rotate_root(repo, director_root_key)
    outcome = run(repo)
    assert outcome.ok, outcome.error
    assert outcome.sha256 == hashlib.sha256(scenario.head).hexdigest()
    assert outcome.root_version == rotated
    meta = repo.metadata_path
    assert outcome.status(f"{meta}{rotated}.root.json") == 200
    assert outcome.status(f"{meta}{rotated + 1}.root.json") == 404
    client = scenario.hub.client(scenario.device)
    for v in range(1, rotated + 1):
        assert client.get(f"{meta}{v}.root.json").status_code == 200
    for v in (rotated + 1, rotated + 2, 10**6):
        answer = client.get(f"{meta}{v}.root.json")
        assert answer.status_code == 404, answer.text
