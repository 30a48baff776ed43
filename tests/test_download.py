import functools
import http.server
import io
import threading
import zipfile

import pytest
from click.testing import CliRunner

from cli import cli
from tests.conftest import write_image


def make_zip(tmp_path, members: dict[str, bytes]):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    path = tmp_path / "serve" / "data.zip"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/serve."""
    (tmp_path / "serve").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "serve"))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def jpeg_bytes(tmp_path, label):
    return write_image(tmp_path / f"src{label}.jpg", label, label).read_bytes()


def test_download_unpacks_and_is_idempotent(tmp_path, server):
    img = jpeg_bytes(tmp_path, 0)
    make_zip(tmp_path, {"hymenoptera_data/train/ants/a.jpg": img, "hymenoptera_data/train/bees/b.jpg": img,
                        "hymenoptera_data/val/ants/c.jpg": img, "hymenoptera_data/val/bees/d.jpg": img})
    dest = tmp_path / "dest"
    r = CliRunner().invoke(cli, ["download", str(dest), "--url", f"{server}/data.zip"])
    assert r.exit_code == 0, r.output
    assert "dataset unpacked at" in r.output and "train 2 files, val 2 files" in r.output
    assert (dest / "hymenoptera_data/val/bees/d.jpg").read_bytes() == img
    assert sorted(p.name for p in dest.iterdir()) == ["hymenoptera_data"]  # no temp leftovers
    r = CliRunner().invoke(cli, ["download", str(dest), "--url", f"{server}/missing.zip"])
    assert r.exit_code == 0 and "already present" in r.output


@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/evil_abs.txt", "hymenoptera_data/../../evil.txt"])
def test_zip_slip_refused(tmp_path, server, evil):
    img = jpeg_bytes(tmp_path, 0)
    make_zip(tmp_path, {"hymenoptera_data/train/a/x.jpg": img, "hymenoptera_data/val/a/y.jpg": img, evil: b"x"})
    dest = tmp_path / "dest"
    r = CliRunner().invoke(cli, ["download", str(dest), "--url", f"{server}/data.zip"])
    assert r.exit_code == 1 and "would land outside the destination" in r.output
    assert not (tmp_path / "evil.txt").exists() and not (dest / "hymenoptera_data").exists()


def test_wrong_layout_and_not_a_zip(tmp_path, server):
    make_zip(tmp_path, {"stuff/readme.txt": b"hello"})
    r = CliRunner().invoke(cli, ["download", str(tmp_path / "d"), "--url", f"{server}/data.zip"])
    assert r.exit_code == 1 and "train/ and val/" in r.output
    (tmp_path / "serve" / "page.zip").write_text("<html>not found</html>")
    r = CliRunner().invoke(cli, ["download", str(tmp_path / "d"), "--url", f"{server}/page.zip"])
    assert r.exit_code == 1 and "is not a zip file" in r.output
    r = CliRunner().invoke(cli, ["download", str(tmp_path / "d"), "--url", f"{server}/nothing.zip"])
    assert r.exit_code == 1 and "cannot download" in r.output and "404" in r.output
