"""--reload-interval: the file signature, and the service reloading when it changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from mtlsproxy import tls, watch
from mtlsproxy.config import Config, build_config
from mtlsproxy.service import make_service
from mtlsproxy.watch import material_files, signature

from . import certfactory


def _pki(tmp_path: Path) -> dict[str, str]:
    ca = certfactory.make_ca()
    cert, key = certfactory.make_server(ca).write(tmp_path, "server")
    (tmp_path / "ca.pem").write_bytes(certfactory.pem(ca.cert))
    return {"cert": str(cert), "key": str(key), "ca": str(tmp_path / "ca.pem")}


def test_every_material_file_is_watched(tmp_path: Path) -> None:
    """Certificate, key, CA, CRLs and password files are all watched."""
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    config = build_config(
        {"backend": "http://a:1", "keystore": "k.p12", "keystore-password-file": str(pw),
         "truststore": "t.p12", "crl": ["a.pem", "b.pem"]}
    )
    expected = (Path("k.p12"), Path("t.p12"), Path("a.pem"), Path("b.pem"), pw)
    assert material_files(config) == expected


def test_signature_changes_on_replace_and_rewrite(tmp_path: Path) -> None:
    """Renaming a new file over the old one, or rewriting it, changes the signature."""
    f = tmp_path / "cert.pem"
    f.write_bytes(b"one")
    first = signature((f,))
    new = tmp_path / "new.pem"
    new.write_bytes(b"one")
    os.replace(new, f)
    second = signature((f,))
    assert second != first
    f.write_bytes(b"two, longer")
    assert signature((f,)) != second
    assert signature((f,)) == signature((f,))


def test_missing_file_is_part_of_the_signature(tmp_path: Path) -> None:
    """A file that disappears (mid-renewal) is seen as a change, not an error."""
    assert signature((tmp_path / "nope",)) == ((str(tmp_path / "nope"), None),)


def test_service_reloads_when_a_file_changes(tmp_path: Path) -> None:
    """
    With --reload-interval, the service swaps in a new context once a watched
    file changed, and not before; an unchanged tree causes no reload.
    """
    files = _pki(tmp_path)
    clock = MemoryReactorClock()
    config = build_config({"backend": "http://a:1", "reload-interval": "5", **files})
    service = make_service(config, clock)
    reloads: list[bool] = []
    original = service.reload
    service.reload = lambda: reloads.append(original()) or True  # type: ignore[method-assign]
    service.startService()
    before = service.creator.context
    clock.advance(5)
    assert reloads == []
    ca = certfactory.make_ca("Renewed CA")
    certfactory.make_server(ca).write(tmp_path, "server")
    clock.advance(5)
    assert reloads == [True]
    assert service.creator.context is not before
    clock.advance(5)
    assert reloads == [True]
    service._watch.stop()  # type: ignore[union-attr]


def test_signature_sees_mode_owner_and_ctime(tmp_path: Path) -> None:
    """
    chmod/chgrp change neither content nor mtime: the signature holds the
    mode, owner, group and ctime, so fixing a file's permissions is a change.
    """
    f = tmp_path / "key.pem"
    f.write_bytes(b"key")
    f.chmod(0o600)
    first = signature((f,))
    st = os.stat(f)
    assert first[0][1] is not None
    assert (st.st_mode, st.st_uid, st.st_gid, st.st_ctime_ns) == first[0][1][4:]
    mtime = st.st_mtime_ns
    f.chmod(0o640)
    assert os.stat(f).st_mtime_ns == mtime
    assert signature((f,)) != first


def _failures(events: list[dict[str, object]]) -> list[str]:
    return [formatEvent(e) for e in events if "reload failed" in formatEvent(e)]


def test_failed_reload_is_retried_quietly_until_it_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A key that cannot be used: the reload fails and is logged once; it is
    retried at every interval (logged again only when the error or the files
    change), and once the key is fixed, even in a way the signature does not
    show, the next retry reloads.
    """
    files = _pki(tmp_path)
    key = Path(files["key"])
    good_key = key.read_bytes()
    clock = MemoryReactorClock()
    config = build_config({"backend": "http://a:1", "reload-interval": "5", **files})
    service = make_service(config, clock)
    attempts: list[Path | None] = []
    load = tls.load_material

    def counting_load(config: Config) -> tls.Material:
        attempts.append(config.key)
        return load(config)

    monkeypatch.setattr(tls, "load_material", counting_load)
    with capturedLogs() as events:
        service.startService()
        before = service.creator.context
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        clock.advance(5)
        assert len(attempts) == 1 and len(_failures(events)) == 1, _failures(events)
        for _ in range(3):
            clock.advance(5)
        assert len(attempts) == 4, "the failed reload was not retried at each interval"
        assert len(_failures(events)) == 1, "the same failure was logged again"

        # another problem (a key of another certificate): a new line
        key.write_bytes(certfactory.make_server(certfactory.make_ca()).key_pem())
        clock.advance(5)
        failures = _failures(events)
        assert len(failures) == 2 and "does not match" in failures[1], failures

        # fixed in a way the signature cannot show: the retry still finds it
        frozen = signature(material_files(config))
        monkeypatch.setattr(watch, "signature", lambda paths: frozen)
        clock.advance(5)
        key.write_bytes(good_key)
        assert service.creator.context is before
        clock.advance(5)
        text = "\n".join(formatEvent(e) for e in events)
        assert "certificates, key, CA and CRLs unchanged" in text, text
        assert len(_failures(events)) == 2
        attempts_when_fixed = len(attempts)
        clock.advance(5)
        assert len(attempts) == attempts_when_fixed, "retried after a reload worked"
    samples = {
        s.labels.get("result"): s.value
        for family in text_string_to_metric_families(service.metrics.render("")[0].decode())
        for s in family.samples
        if s.name == "mtlsproxy_reloads_total"
    }
    assert samples == {"failed": 2.0, "ok": 1.0}, samples
    service._watch.stop()  # type: ignore[union-attr]
