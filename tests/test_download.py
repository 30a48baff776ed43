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


def dataset_zip(tmp_path, top: str, extra: dict | None = None):
    img = jpeg_bytes(tmp_path, 0)
    members = {f"{top}/{s}/{c}/{c}.jpg": img for s in ("train", "val") for c in ("ants", "bees")}
    return make_zip(tmp_path, {**members, **(extra or {})})


@pytest.mark.parametrize("top", ["important", "hymenoptera_data"])
def test_existing_folder_of_the_zips_name_is_never_replaced(tmp_path, server, top):
    dataset_zip(tmp_path, top)
    dest = tmp_path / "dest"
    mine = dest / top / "my_notes.txt"  # the user's folder: not a dataset, or an incomplete one
    mine.parent.mkdir(parents=True)
    mine.write_text("keep me")
    r = CliRunner().invoke(cli, ["download", str(dest), "--url", f"{server}/data.zip"])
    assert r.exit_code == 1, r.output
    # (the last line: the test server's request log shares the captured stderr)
    assert r.output.splitlines()[-1] == (f"Error: {dest / top} already exists and the zip would unpack there; tlearn "
                                         "never replaces a folder it did not create: move it away or choose another DEST")
    assert mine.read_text() == "keep me" and sorted(p.name for p in (dest / top).iterdir()) == ["my_notes.txt"]
    assert sorted(p.name for p in dest.iterdir()) == [top]  # no temp leftovers


def test_zip_bomb_is_refused_before_unpacking(tmp_path, server):
    buf = io.BytesIO()
    img = jpeg_bytes(tmp_path, 0)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for s in ("train", "val"):
            z.writestr(f"d/{s}/ants/a.jpg", img)
        z.writestr("d/train/ants/zeros.jpg", bytes(80 << 20))  # 80 MiB of zeros, ~80 KB compressed
    (tmp_path / "serve" / "bomb.zip").write_bytes(buf.getvalue())
    dest = tmp_path / "dest"
    r = CliRunner().invoke(cli, ["download", str(dest), "--url", f"{server}/bomb.zip"])
    assert r.exit_code == 1, r.output
    assert "MiB would unpack to 80.0 MiB (more than 100x its size or 64 GiB); not a photo dataset" in r.output
    assert r.output.splitlines()[-1].startswith("Error: refused zip: 0.1 MiB")
    assert list(dest.iterdir()) == []


def test_unpacked_size_rules():
    from pipeline.download import MAX_RATIO, ZipRefused, check_unpacked_size

    check_unpacked_size(1000, 60 << 20, 1 << 40)  # small unpacked totals never trip the ratio
    check_unpacked_size(10 << 20, MAX_RATIO * (10 << 20), 1 << 40)
    with pytest.raises(ZipRefused, match="would unpack to"):
        check_unpacked_size(10 << 20, MAX_RATIO * (10 << 20) + 1, 1 << 40)
    with pytest.raises(ZipRefused, match="would unpack to"):
        check_unpacked_size(1 << 40, (64 << 30) + 1, 1 << 50)
    with pytest.raises(ZipRefused, match=r"unpacks to 2.0 MiB but only 1.0 MiB are free at the destination"):
        check_unpacked_size(2 << 20, 2 << 20, 1 << 20)


def test_member_larger_than_its_header_is_refused(tmp_path):
    from pipeline.download import ZipRefused, _copy_bounded

    with pytest.raises(ZipRefused, match="holds more data than its header declares"):
        _copy_bounded(io.BytesIO(b"x" * 100), io.BytesIO(), 99, "a.jpg")
    out = io.BytesIO()
    _copy_bounded(io.BytesIO(b"x" * 100), out, 100, "a.jpg")
    assert out.getvalue() == b"x" * 100
