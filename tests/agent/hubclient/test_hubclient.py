"""HubClient against the real gateway over mutual TLS, and against a hub that misbehaves.

Every refusal asserts the exception type and its reason; the running system
is never touched here (the client only returns bytes or raises).
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard
from sqlalchemy import select
from tuf.api.metadata import TargetFile

from skylift.agent.config import AgentConfig
from skylift.agent.errors import ReportRejectedError, ReportTransportError
from skylift.agent.hubclient import HubClient
from skylift.agent.machine import State
from skylift.agent.plan import ByteRange
from skylift.agent.ports import DeltaOffer, HubUnreachableError, Offer, UpdateRefusedError
from skylift.agent.reports import Report
from skylift.chunks import compress_index
from skylift.hub.content import version_segment
from skylift.hub.db.models import DeviceEvent
from skylift.hub.repositories import Director, ImageRepositories

from .conftest import (
    PRODUCT,
    VERSION,
    Agent,
    FakeHub,
    Hub,
    closed_port,
    make_config,
    new_agent,
    release_target,
)

# -- poll -----------------------------------------------------------------------------------------


def test_poll_answers_200_then_304_once_checked(agent: Agent) -> None:
    first = agent.client.poll(state="idle", progress=None)
    assert first.changed
    assert first.poll_interval_s == agent.hub.ctx.config.poll_interval_s
    assert agent.client.check(installed_version=None, allow_downgrade=False) is None
    second = agent.client.poll(state="idle", progress=None)
    assert not second.changed
    assert second.poll_interval_s == first.poll_interval_s
    agent.assign_release()
    assert agent.client.poll(state="idle", progress=None).changed


def test_a_failed_check_is_not_hidden_by_304(agent: Agent, tmp_path: Path) -> None:
    agent.client.poll(state="idle", progress=None)
    agent.client.check(installed_version=None, allow_downgrade=False)
    agent.assign_release()
    assert agent.client.poll(state="idle", progress=None).changed
    with pytest.raises(UpdateRefusedError):  # e.g. it runs a newer version
        agent.client.check(installed_version="2.0", allow_downgrade=False)
    assert agent.client.poll(state="idle", progress=None).changed  # so it checks again
    agent.client.check(installed_version=None, allow_downgrade=False)
    assert not agent.client.poll(state="idle", progress=None).changed


def test_poll_announces_the_state(agent: Agent) -> None:
    agent.client.poll(state="downloading", progress=40)
    agent.hub.state.flush_last_seen()
    assert agent.hub.device_row(agent.device_id).state.value == "downloading"


# -- check: the Uptane cross-check ----------------------------------------------------------------


def test_check_offers_the_assigned_release(agent: Agent) -> None:
    assert agent.client.check(installed_version=None, allow_downgrade=False) is None
    agent.assign_release()
    offer = agent.client.check(installed_version="0.9", allow_downgrade=False)
    target = release_target(agent.hub)
    assert offer == Offer(
        product=PRODUCT, version=VERSION, target_name=f"{VERSION}.head",
        length=len(agent.hub.head), sha256=hashlib.sha256(agent.hub.head).hexdigest(),
        hardware_ids=("hw1",), payloads=(), custom=target.custom,
    )  # fmt: skip
    # What it runs already is no offer.
    assert agent.client.check(installed_version=VERSION, allow_downgrade=False) is None


def test_older_release_is_refused_unless_allowed(agent: Agent) -> None:
    agent.assign_release()
    with pytest.raises(UpdateRefusedError, match=r"older than the installed 1\.0\.10"):
        agent.client.check(installed_version="1.0.10", allow_downgrade=False)
    offer = agent.client.check(installed_version="1.0.10", allow_downgrade=True)
    assert offer is not None and offer.version == VERSION


def test_target_the_image_repository_lacks_is_refused(agent: Agent) -> None:
    target = release_target(agent.hub)
    custom = {**target.custom, "version": "7.7.7"}
    agent.assign(TargetFile(target.length, target.hashes, "7.7.7.head", {"custom": custom}))
    with pytest.raises(UpdateRefusedError, match="director names '7.7.7.head', which the image"):
        agent.client.check(installed_version=None, allow_downgrade=False)


def test_hashes_that_disagree_are_refused(agent: Agent) -> None:
    target = release_target(agent.hub)
    agent.assign(
        TargetFile(target.length, {"sha256": "0" * 64}, target.path, {"custom": target.custom})
    )
    with pytest.raises(UpdateRefusedError, match="disagree on '1.0.0.head': the hashes differ$"):
        agent.client.check(installed_version=None, allow_downgrade=False)
    agent.assign(
        TargetFile(target.length + 1, target.hashes, target.path, {"custom": target.custom})
    )
    with pytest.raises(
        UpdateRefusedError, match=r"disagree .*: length 1161 \(director\) vs 1160 \(image\)$"
    ):
        agent.client.check(installed_version=None, allow_downgrade=False)


def test_bundle_for_other_hardware_is_refused(hub: Hub, tmp_path: Path) -> None:
    other = new_agent(hub, tmp_path, hardware_id="hw2")
    try:
        other.assign_release()
        with pytest.raises(UpdateRefusedError, match="for hardware \\['hw1'\\], not .* hw2"):
            other.client.check(installed_version=None, allow_downgrade=False)
    finally:
        other.client.close()


def test_other_products_release_is_refused(agent: Agent) -> None:
    agent.assign(release_target(agent.hub, "other-gw", "9.9.9"))
    with pytest.raises(UpdateRefusedError, match="names '9.9.9.head', which the image"):
        agent.client.check(installed_version=None, allow_downgrade=False)


def _expire(hub: Hub, *, device_id: str | None) -> None:
    """Re-sign snapshot and timestamp on a clock two days late: the timestamp is expired."""
    late = datetime.now(UTC) - timedelta(days=2)
    online = hub.ctx.online_signers
    if device_id is not None:
        director = Director(hub.ctx.store, online=online, clock=lambda: late)
        assert director.refresh(device_id, margin=timedelta(days=400))
    else:
        images = ImageRepositories(hub.ctx.store, online=online, clock=lambda: late)
        assert images.refresh(PRODUCT, margin=timedelta(days=400))


def test_expired_director_timestamp_is_refused(agent: Agent) -> None:
    agent.assign_release()
    _expire(agent.hub, device_id=agent.device_id)
    with pytest.raises(UpdateRefusedError, match="director repository: ExpiredMetadataError"):
        agent.client.check(installed_version=None, allow_downgrade=False)
    assert agent.hub.ctx.director.refresh(agent.device_id)
    assert agent.client.check(installed_version=None, allow_downgrade=False) is not None


def test_expired_image_timestamp_is_refused(agent: Agent) -> None:
    agent.assign_release()
    _expire(agent.hub, device_id=None)
    try:
        with pytest.raises(UpdateRefusedError, match="image repository: ExpiredMetadataError"):
            agent.client.check(installed_version=None, allow_downgrade=False)
    finally:
        assert agent.hub.ctx.images.refresh(PRODUCT)
    assert agent.client.check(installed_version=None, allow_downgrade=False) is not None


# -- content --------------------------------------------------------------------------------------


def test_fetches_head_and_index(agent: Agent) -> None:
    agent.assign_release()
    offer = agent.offer()
    assert agent.client.fetch_head(offer) == agent.hub.head
    # A release published without a compressed index: the raw pages.
    assert agent.client.fetch_index(offer, "rootfs") == b"index pages of 1.0.0"


def _zst_key() -> str:
    return f"releases/{PRODUCT}/{version_segment(VERSION)}/rootfs.index.zst"


def test_fetches_the_compressed_index_when_the_hub_has_one(agent: Agent) -> None:
    agent.assign_release()
    offer = agent.offer()
    pages = b"compressed pages " * 4000
    packed = compress_index(pages)
    assert len(packed) < len(pages) // 20
    agent.hub.ctx.store.put(_zst_key(), packed)
    assert agent.client.fetch_index(offer, "rootfs") == pages


def _delta_offer(data: bytes, from_sha256: str = "ab" * 32) -> DeltaOffer:
    return DeltaOffer(
        "rootfs", "0.9.0", from_sha256, 4096, hashlib.sha256(data).hexdigest(), len(data)
    )


def test_fetches_a_delta_in_bounded_ranges_and_resumes(agent: Agent, tmp_path: Path) -> None:
    agent.assign_release()
    offer = agent.offer()
    data = secrets.token_bytes(3 * 1024 * 1024 + 123)
    delta = _delta_offer(data)
    key = f"releases/{PRODUCT}/{version_segment(VERSION)}/rootfs.{delta.from_sha256}.delta"
    agent.hub.ctx.store.put(key, data)
    dest = tmp_path / "rootfs.delta"
    dest.write_bytes(data[:1000])  # what an interrupted download left
    config = replace(
        agent.config, download=replace(agent.config.download, max_range_bytes=1024 * 1024)
    )
    with HubClient(config) as client:
        got = client.fetch_delta(offer, delta, dest)
    assert got == len(data) - 1000  # only the rest was fetched, in 1 MiB ranges
    assert dest.read_bytes() == data
    assert dest.stat().st_mode & 0o777 == 0o600
    # A complete file is not fetched again; a longer one is started over.
    assert agent.client.fetch_delta(offer, delta, dest) == 0
    dest.write_bytes(data + b"junk")
    assert agent.client.fetch_delta(offer, delta, dest) == len(data)
    assert dest.read_bytes() == data


def test_a_delta_the_hub_does_not_have_is_refused(agent: Agent, tmp_path: Path) -> None:
    agent.assign_release()
    offer = agent.offer()
    with pytest.raises(
        UpdateRefusedError, match=r"delta: the hub answered HTTP 404: no such file: rootfs\.c"
    ) as e:
        agent.client.fetch_delta(offer, _delta_offer(b"x" * 500, "cd" * 32), tmp_path / "d")
    assert "file://" not in e.value.message  # the store's location is not for devices


@pytest.mark.parametrize(
    ("served", "reason"),
    [
        (b"index pages, not zstd", "not a zstd frame"),
        (zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100), "declare"),
        (compress_index(b"x" * 100) + b"junk", "not exactly one frame"),
        (compress_index(b"x" * 100)[:-6], "not exactly one frame|corrupt"),
        (compress_index(bytes(4096)), "declares 4096 bytes; at most 1024"),
    ],
    ids=["not zstd", "no size", "trailing bytes", "truncated", "over the cap"],
)
def test_a_compressed_index_that_is_not_one_bounded_frame_is_refused(
    agent: Agent, served: bytes, reason: str
) -> None:
    agent.assign_release()
    offer = agent.offer()
    agent.hub.ctx.store.put(_zst_key(), served)
    with HubClient(agent.config, max_release_file_bytes=1024) as client:
        client.check(installed_version=None, allow_downgrade=False)
        with pytest.raises(UpdateRefusedError, match=f"chunk index: .*({reason})"):
            client.fetch_index(offer, "rootfs")


def test_head_that_is_not_the_signed_one_is_refused(agent: Agent) -> None:
    agent.assign_release()
    offer = agent.offer()
    forged = replace(offer, length=offer.length - 1)
    with pytest.raises(
        UpdateRefusedError, match="bundle head: the hub's answer is more than 1159 bytes"
    ):
        agent.client.fetch_head(forged)
    with pytest.raises(UpdateRefusedError, match="404"):
        agent.client.fetch_head(replace(offer, sha256="1" * 64))


def _ranges(*spans: tuple[int, int]) -> list[ByteRange]:
    return [ByteRange(a, b) for a, b in spans]


@pytest.mark.parametrize(
    "ranges",
    [
        _ranges((0, 1000)),  # one range: a plain 206
        _ranges((5, 17), (1000, 4000), (200_000, 299_999)),  # multipart/byteranges
        _ranges((10, 20), (20, 30), (30, 100)),  # adjacent: the hub merges them into one part
        _ranges((100, 200), (150, 250), (100, 200)),  # overlapping and repeated
        _ranges((299_990, 300_000), (0, 10), (50, 50)),  # out of order, and an empty one
        [ByteRange(i * 1000, i * 1000 + 10) for i in range(40)],  # several requests
    ],
    ids=["single", "multi", "adjacent", "overlapping", "unordered", "many"],
)
def test_fetches_exactly_the_ranges_asked(agent: Agent, ranges: list[ByteRange]) -> None:
    agent.assign_release()
    offer = agent.offer()
    got = list(agent.client.fetch_ranges(offer, "rootfs", ranges))
    assert [r for r, _ in got] == ranges
    for r, data in got:
        assert data == agent.hub.pack[r.start : r.end], r


def test_ranges_past_the_end_of_the_pack_are_refused(agent: Agent) -> None:
    agent.assign_release()
    offer = agent.offer()
    size = len(agent.hub.pack)
    with pytest.raises(UpdateRefusedError, match=f"lacks bytes {size - 10}-{size + 9}"):
        list(agent.client.fetch_ranges(offer, "rootfs", _ranges((size - 10, size + 10))))
    with pytest.raises(UpdateRefusedError, match="416"):
        list(agent.client.fetch_ranges(offer, "rootfs", _ranges((size + 10, size + 20))))


def test_release_the_device_may_not_read_is_refused(agent: Agent) -> None:
    agent.assign_release()
    offer = agent.offer()
    other = replace(offer, version="9.9.9")  # other-gw's release
    with pytest.raises(UpdateRefusedError, match="chunk index: the hub answered HTTP 404"):
        agent.client.fetch_index(other, "rootfs")


# -- reports --------------------------------------------------------------------------------------


def _report(seq: int, **kwargs: object) -> Report:
    fields: dict[str, object] = {
        "report_id": f"r-{secrets.token_hex(4)}", "seq": seq, "kind": "update",
        "created_at": datetime.now(UTC), "state": State.DOWNLOADING, "progress": 10,
    }  # fmt: skip
    fields.update(kwargs)
    return Report(**fields)  # type: ignore[arg-type]


def test_sends_reports_once(agent: Agent) -> None:
    reports = [_report(1), _report(2, state=State.INSTALLED, progress=None, result="ok")]
    agent.client.send(reports)
    agent.client.send(reports)  # a retry after a lost answer: stored once
    device = agent.hub.device_row(agent.device_id)
    with agent.hub.ctx.sessions() as session:
        stored = session.scalars(
            select(DeviceEvent.report_id).where(DeviceEvent.device_id == device.id)
        ).all()
    assert sorted(stored) == sorted(r.report_id for r in reports)
    assert agent.hub.device_row(agent.device_id).state.value == "installed"


def test_malformed_report_is_rejected(agent: Agent) -> None:
    with pytest.raises(ReportRejectedError, match="HTTP 400"):
        agent.client.send([_report(1, kind="has spaces")])


# -- a hub that is down or misbehaves -------------------------------------------------------------


def _config_for(agent: Agent, url: str, ca_pem: bytes, **kwargs: object) -> AgentConfig:
    """The agent's own files (identity, pinned roots), pointed at another server."""
    base = agent.config.storage.state_dir.parent
    return make_config(base, url, ca_pem, device_id=agent.device_id, **kwargs)  # type: ignore[arg-type]


def _offer(agent: Agent) -> Offer:
    agent.assign_release()
    return agent.offer()


def test_hub_down_is_unreachable(agent: Agent) -> None:
    offer = _offer(agent)
    config = _config_for(agent, f"https://127.0.0.1:{closed_port()}", agent.hub.ca_pem)
    with HubClient(config) as client:
        with pytest.raises(HubUnreachableError, match="poll: cannot reach the hub at https://127"):
            client.poll(state="idle", progress=None)
        with pytest.raises(
            HubUnreachableError,
            match=r"director repository: .*2\.root\.json: Failed to establish a new connection: .*refused",
        ):
            client.check(installed_version=None, allow_downgrade=False)
        with pytest.raises(HubUnreachableError, match="bundle head: cannot reach the hub"):
            client.fetch_head(offer)
        with pytest.raises(HubUnreachableError, match="cannot reach the hub"):
            list(client.fetch_ranges(offer, "rootfs", _ranges((0, 10))))
        with pytest.raises(ReportTransportError, match="reports: cannot reach the hub"):
            client.send([_report(1)])


def test_server_errors_are_unreachable(agent: Agent, fake_hub: FakeHub) -> None:
    offer = _offer(agent)
    fake_hub.set_mode("500")
    with HubClient(_config_for(agent, fake_hub.url, fake_hub.ca_pem)) as client:
        with pytest.raises(
            HubUnreachableError, match="poll: the hub answered HTTP 500: the hub is"
        ):
            client.poll(state="idle", progress=None)
        with pytest.raises(HubUnreachableError, match="director repository: HTTP 500"):
            client.check(installed_version=None, allow_downgrade=False)
        with pytest.raises(HubUnreachableError, match="chunk index: the hub answered HTTP 500"):
            client.fetch_index(offer, "rootfs")
        with pytest.raises(ReportTransportError, match="HTTP 500"):
            client.send([_report(1)])


def test_endless_answers_are_cut_and_refused(agent: Agent, fake_hub: FakeHub) -> None:
    offer = _offer(agent)
    fake_hub.set_mode("endless")
    config = _config_for(agent, fake_hub.url, fake_hub.ca_pem, max_metadata_bytes=65536)
    with HubClient(config, max_release_file_bytes=1024 * 1024) as client:
        with pytest.raises(HubUnreachableError, match="poll: the hub's answer is more than 65536"):
            client.poll(state="idle", progress=None)
        with pytest.raises(UpdateRefusedError, match="director repository: an answer is longer"):
            client.check(installed_version=None, allow_downgrade=False)
        with pytest.raises(UpdateRefusedError, match="bundle head: .*more than 1160 bytes"):
            client.fetch_head(offer)
        with pytest.raises(UpdateRefusedError, match="chunk index: .*more than 1048576 bytes"):
            client.fetch_index(offer, "rootfs")
        with pytest.raises(UpdateRefusedError, match="pack ranges: .*endless or oversized"):
            list(client.fetch_ranges(offer, "rootfs", _ranges((0, 10), (20, 30))))
        with pytest.raises(ReportTransportError, match="more than"):
            client.send([_report(1)])


def test_whole_pack_instead_of_ranges_is_refused(agent: Agent, fake_hub: FakeHub) -> None:
    offer = _offer(agent)
    fake_hub.set_mode("whole")
    config = _config_for(agent, fake_hub.url, fake_hub.ca_pem)
    with (
        HubClient(config) as client,
        pytest.raises(UpdateRefusedError, match="whole pack instead of the ranges"),
    ):
        list(client.fetch_ranges(offer, "rootfs", _ranges((0, 5000), (6000, 7000))))


def test_too_slow_an_answer_is_cut(agent: Agent, fake_hub: FakeHub) -> None:
    fake_hub.set_mode("endless")
    ticks = itertools.count(step=1000.0)  # every look at the clock is 1000 s later
    config = _config_for(agent, fake_hub.url, fake_hub.ca_pem)
    with HubClient(config, monotonic=lambda: next(ticks)) as client:
        with pytest.raises(HubUnreachableError, match="poll: the hub's answer is too slow"):
            client.poll(state="idle", progress=None)
        with pytest.raises(
            HubUnreachableError,
            match=r"director repository: /device/v1/director/.*/2\.root\.json: too slow, not complete after \d+ s",
        ):
            client.check(installed_version=None, allow_downgrade=False)


def test_wrong_server_certificate_is_unreachable(agent: Agent, fake_hub: FakeHub) -> None:
    # The fake hub's certificate does not chain to the hub CA the agent trusts.
    config = _config_for(agent, fake_hub.url, agent.hub.ca_pem)
    with HubClient(config) as client, pytest.raises(HubUnreachableError, match="CERTIFICATE"):
        client.poll(state="idle", progress=None)
    assert fake_hub.paths == []
