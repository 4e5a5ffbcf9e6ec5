"""--reload-interval: the file signature, and the service reloading when it changes."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock

from mtlsproxy.config import build_config
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
