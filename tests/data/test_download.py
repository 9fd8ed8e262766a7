"""Dataset download and extraction: checksums, atomic files, resuming, and archives that try to escape.

A local `http.server` in a thread plays the remote (it can cut a response short, ignore Range, or
answer with an HTML page); `file://` URLs are the other transport. Nothing touches the internet.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from galen.flows.ingest.download import (
    PUBLIC_DATASETS,
    PublicDataset,
    RemoteFile,
    download,
    extract,
    fetch,
    medmnist_files,
)
from galen.model.errors import GalenInputError

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB: spans several read chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FakeRemote:
    """What the test server serves and how it misbehaves; it records the Range header of each request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {"/data.bin": PAYLOAD}
        self.cut_after: int | None = None   # send only this many body bytes, then drop the connection
        self.honour_range = True
        self.content_type = "application/octet-stream"
        self.ranges: list[str | None] = []


@pytest.fixture
def remote():
    state = FakeRemote()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            state.ranges.append(self.headers.get("Range"))
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and state.honour_range:
                start = int(match[1])
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", state.content_type)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            chunk = body[start:] if state.cut_after is None else body[start:start + state.cut_after]
            self.wfile.write(chunk)
            self.close_connection = True

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_http_download_with_matching_checksum(remote, tmp_path):
    path = download(f"{remote.url}/data.bin", tmp_path / "out" / "data.bin", SHA, expected_size=len(PAYLOAD), timeout=5)
    assert path == tmp_path / "out" / "data.bin" and path.read_bytes() == PAYLOAD
    assert leftovers(tmp_path / "out") == ["data.bin"]  # no .part left behind
    # re-running finds the verified file and does not fetch it again
    assert download(f"{remote.url}/data.bin", tmp_path / "out" / "data.bin", SHA, timeout=5) == path
    assert len(remote.ranges) == 1


def test_file_url_download_into_a_folder(tmp_path):
    src = tmp_path / "src" / "data.bin"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    (tmp_path / "dl").mkdir()
    path = download(src.as_uri(), tmp_path / "dl", SHA)
    assert path == tmp_path / "dl" / "data.bin" and path.read_bytes() == PAYLOAD


def test_checksum_mismatch_deletes_the_download_and_names_both_hashes(remote, tmp_path):
    wrong = "0" * 64
    with pytest.raises(GalenInputError) as err:
        download(f"{remote.url}/data.bin", tmp_path / "data.bin", wrong, timeout=5)
    assert wrong in str(err.value) and SHA in str(err.value)
    assert leftovers(tmp_path) == []
    src = tmp_path / "local.bin"
    src.write_bytes(PAYLOAD)
    with pytest.raises(GalenInputError, match=SHA):
        download(src.as_uri(), tmp_path / "copy.bin", wrong)
    assert not (tmp_path / "copy.bin").exists() and not (tmp_path / "copy.bin.part").exists()


def test_interrupted_download_resumes_on_rerun(remote, tmp_path):
    dest = tmp_path / "data.bin"
    remote.cut_after = 300_000
    with pytest.raises(GalenInputError, match="run again"):
        download(f"{remote.url}/data.bin", dest, SHA, timeout=5)
    part = tmp_path / "data.bin.part"
    assert not dest.exists() and part.stat().st_size == 300_000
    remote.cut_after = None
    assert download(f"{remote.url}/data.bin", dest, SHA, timeout=5).read_bytes() == PAYLOAD
    assert remote.ranges == [None, "bytes=300000-"]  # the second request asked only for the rest
    assert not part.exists()


def test_server_ignoring_range_restarts_cleanly(remote, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:1000])
    remote.honour_range = False
    path = download(f"{remote.url}/data.bin", tmp_path / "data.bin", SHA, timeout=5)
    assert path.read_bytes() == PAYLOAD  # not the first 1000 bytes twice


def test_complete_part_file_and_file_url_resume(remote, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)  # finished but never renamed: the server answers 416
    assert download(f"{remote.url}/data.bin", tmp_path / "data.bin", SHA, timeout=5).read_bytes() == PAYLOAD
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    (tmp_path / "copy.bin.part").write_bytes(PAYLOAD[:12345])
    assert download(src.as_uri(), tmp_path / "copy.bin", SHA).read_bytes() == PAYLOAD


def test_size_html_scheme_and_missing_file_errors(remote, tmp_path):
    with pytest.raises(GalenInputError, match="expected 10"):
        download(f"{remote.url}/data.bin", tmp_path / "a.bin", None, expected_size=10, timeout=5)
    assert leftovers(tmp_path) == []
    remote.content_type = "text/html; charset=utf-8"
    with pytest.raises(GalenInputError, match="HTML page"):
        download(f"{remote.url}/data.bin", tmp_path / "b.zip", None, timeout=5)
    with pytest.raises(GalenInputError, match="HTTP 404"):
        download(f"{remote.url}/missing.zip", tmp_path / "c.zip", None, timeout=5)
    with pytest.raises(GalenInputError, match="only http"):
        download("ftp://example.org/x.zip", tmp_path / "d.zip", None)
    assert not any(p.suffix == ".zip" for p in tmp_path.iterdir())


# --- extraction ---------------------------------------------------------------------------------

def make_zip(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return path


def make_tar(path: Path, members: dict[str, bytes], link: tuple[str, str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = link[2], link[1]
            tf.addfile(info)
    return path


def test_extract_zip_and_tar_gz(tmp_path):
    members = {"imgs/a.png": b"A", "imgs/sub/b.png": b"B", "train.json": b"[]"}
    for archive in (make_zip(tmp_path / "x.zip", members), make_tar(tmp_path / "x.tar.gz", members)):
        out = extract(archive, tmp_path / archive.name.replace(".", "_"))
        assert (out / "imgs" / "sub" / "b.png").read_bytes() == b"B" and (out / "train.json").read_bytes() == b"[]"


@pytest.mark.parametrize("kind, member, message", [
    ("zip", "../evil.txt", r"'\.\.'"),
    ("zip", "ok/../../evil.txt", r"'\.\.'"),
    ("zip", "/tmp/evil.txt", "absolute"),
    ("zip", "..\\evil.txt", r"'\.\.'"),
    ("zip", "C:/evil.txt", "absolute"),
    ("tar", "../evil.txt", r"'\.\.'"),
    ("tar", "/evil.txt", "absolute"),
])
def test_extract_refuses_escaping_members_before_writing_anything(tmp_path, kind, member, message):
    members = {"good.txt": b"fine", member: b"pwned"}
    archive = make_zip(tmp_path / "bad.zip", members) if kind == "zip" else make_tar(tmp_path / "bad.tar.gz", members)
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(GalenInputError, match=message):
        extract(archive, dest)
    assert not (dest / "good.txt").exists()  # checked up front: nothing half-extracted
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_extract_refuses_links(tmp_path):
    with pytest.raises(GalenInputError, match="symlink"):
        extract(make_zip(tmp_path / "l.zip", {"a.txt": b"a"}, symlink="passwd"), tmp_path / "z")
    with pytest.raises(GalenInputError, match="link"):
        extract(make_tar(tmp_path / "s.tar.gz", {"a.txt": b"a"}, ("passwd", "/etc/passwd", tarfile.SYMTYPE)),
                tmp_path / "t")
    with pytest.raises(GalenInputError, match="link"):
        extract(make_tar(tmp_path / "h.tar.gz", {"a.txt": b"a"}, ("hard", "../../etc/passwd", tarfile.LNKTYPE)),
                tmp_path / "u")
    assert not (tmp_path / "z" / "a.txt").exists() and not (tmp_path / "t" / "a.txt").exists()
    with pytest.raises(GalenInputError, match="can only extract"):
        extract(tmp_path / "x.rar", tmp_path / "v")


# --- the dataset table ---------------------------------------------------------------------------

def test_public_dataset_table_is_honest():
    for entry in PUBLIC_DATASETS.values():
        for remote_file in entry.files:
            assert remote_file.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", remote_file.sha256)
            assert remote_file.url.startswith("https://") and remote_file.filename
        assert entry.license and entry.homepage.startswith("https://")
    for name in ("mimic-cxr", "mednli"):
        assert PUBLIC_DATASETS[name].credentialed and not PUBLIC_DATASETS[name].files
    wanted = {"vqa-rad", "slake", "pathvqa", "medmnist", "iu-xray", "roco", "meqsum"}
    assert wanted <= set(PUBLIC_DATASETS) and not any(PUBLIC_DATASETS[n].credentialed for n in wanted)


def test_fetch_credentialed_or_manual_datasets_says_what_to_do(tmp_path):
    with pytest.raises(GalenInputError, match="credentialed"):
        fetch("mednli", tmp_path)
    with pytest.raises(GalenInputError, match="huggingface-cli"):
        fetch("pathvqa", tmp_path)
    with pytest.raises(GalenInputError, match="unknown dataset"):
        fetch("imagenet", tmp_path)


def test_fetch_downloads_and_extracts_a_listed_dataset(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "toy.zip", {"toy/trainset.json": b"[]"})
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    entry = PublicDataset("toy", "vqa-rad", "https://example.org", "CC0",
                          (RemoteFile(archive.as_uri(), "toy.zip", sha256=sha, extract=True),))
    monkeypatch.setitem(PUBLIC_DATASETS, "toy", entry)
    out = fetch("toy", tmp_path / "data")
    assert (out / "toy" / "trainset.json").read_bytes() == b"[]" and (out / "toy.zip").is_file()


def test_medmnist_files_use_the_publishers_urls_and_md5():
    import medmnist  # a dependency: never skipped
    (path64,) = medmnist_files(["pathmnist"], size=64)
    assert path64.filename == "pathmnist_64.npz" and path64.url == medmnist.INFO["pathmnist"]["url_64"]
    assert path64.md5 == medmnist.INFO["pathmnist"]["MD5_64"] and path64.sha256 is None
    assert medmnist_files(["chestmnist"])[0].filename == "chestmnist.npz"
    with pytest.raises(GalenInputError, match="no size 32"):
        medmnist_files(["pathmnist"], size=32)


def test_md5_is_checked_too(tmp_path):
    src = tmp_path / "f.npz"
    src.write_bytes(PAYLOAD)
    with pytest.raises(GalenInputError, match="md5 mismatch"):
        download(src.as_uri(), tmp_path / "g.npz", None, md5="0" * 32)
    ok = download(src.as_uri(), tmp_path / "g.npz", None, md5=hashlib.md5(PAYLOAD).hexdigest())  # noqa: S324
    assert ok.read_bytes() == PAYLOAD
