"""Fetching public datasets: checksummed, resumable downloads and archive extraction that stays in its folder.

`download` streams into `<dest>.part` and renames it to `dest` only after the size and checksum
check out, so `dest` is either absent or complete and verified; an interrupted download leaves the
`.part` file and the next run resumes it (HTTP Range; `file://` seeks). A finished `dest` whose
checksum matches is not fetched again, so the step is re-runnable. `extract` refuses any archive
member that would land outside the destination (`..`, absolute paths, drive letters, symlinks,
hard links, devices) before writing anything, and any member whose size is over
`ingest.limits.max_member_bytes` (or an archive of more than `max_members` members): the declared
size is checked first and the bytes are counted while they are copied, so a decompression bomb stops
at the limit (limits.py).

`PUBLIC_DATASETS` lists where each public dataset comes from. A checksum is given only where it
is known for certain; elsewhere it is None (said in a comment) and the download is verified by size
and content type only. Credentialed datasets (PhysioNet) are listed with `credentialed=True`: they
are never downloaded here; pass the local copy to `galen ingest --source`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Any
from urllib.parse import unquote, urlparse

from galen.flows.ingest.limits import IngestLimits, resolve
from galen.model.errors import GalenInputError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "galen-ingest/0.1 (+dataset download)"
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


# --- download -----------------------------------------------------------------------------------

def file_hash(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _filename(url: str) -> str:
    name = unquote(PurePosixPath(urlparse(url).path).name)
    if not name:
        raise GalenInputError(f"cannot name the file of {url}; pass dest as a file path")
    return name


def _matches(path: Path, sha256: str | None, md5: str | None, expected_size: int | None) -> bool:
    if expected_size is not None and path.stat().st_size != expected_size:
        return False
    if sha256 and file_hash(path, "sha256") != sha256.lower():
        return False
    return not (md5 and file_hash(path, "md5") != md5.lower())


def _open(url: str, offset: int, timeout: float) -> tuple[IO[bytes] | None, int | None, bool, str]:
    """(stream, bytes still to come or None, whether it starts at `offset`, content type).

    A None stream means the server says the range is past the end: the `.part` file is complete.
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(unquote(parsed.path)))
        if not path.is_file():
            raise GalenInputError(f"{url}: no such file")
        stream = path.open("rb")
        stream.seek(min(offset, path.stat().st_size))
        return stream, max(path.stat().st_size - offset, 0), True, ""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - scheme checked by caller
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            return None, 0, True, ""
        hint = " (a login or licence page: is this dataset credentialed?)" if e.code in (401, 403) else ""
        raise GalenInputError(f"{url}: HTTP {e.code} {e.reason}{hint}") from e
    except (urllib.error.URLError, OSError) as e:
        raise GalenInputError(f"{url}: cannot connect ({e}); check the URL and the network, then run again") from e
    length = response.headers.get("Content-Length")
    remaining = int(length) if length and length.isdigit() else None
    return response, remaining, response.status == 206, response.headers.get("Content-Type", "")


def download(url: str, dest: Path, sha256: str | None, *, expected_size: int | None = None, timeout: float = 60,
             md5: str | None = None) -> Path:
    """Fetch `url` (http, https, file) to `dest` (a file path, or an existing folder), verified and atomic.

    `sha256` (or, where a publisher only gives one, `md5`) is checked before `dest` appears; a
    mismatch deletes the download and raises with both hashes. Returns the path of the file.
    """
    scheme = urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise GalenInputError(f"{url}: only http(s):// and file:// URLs can be downloaded")
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / _filename(url)
    if dest.is_file():
        if _matches(dest, sha256, md5, expected_size):
            log.info("%s already present and verified; not downloading again", dest)
            return dest
        log.warning("%s exists but does not match the expected size/checksum; downloading again", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    stream, remaining, resumed, content_type = _open(url, offset, timeout)
    if not resumed:
        offset = 0  # the server ignored the Range header: start over
    if stream is not None and content_type.startswith("text/html") and dest.suffix.lower() not in (".html", ".htm"):
        stream.close()
        raise GalenInputError(f"{url} answered with an HTML page instead of {dest.name} (a login, licence or "
                              "confirmation page?); download it in a browser and pass the local path")
    received = 0
    if stream is not None:
        from tqdm import tqdm

        total = offset + remaining if remaining is not None else None
        try:
            with stream, part.open("ab" if offset else "wb") as out, \
                    tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                for block in iter(lambda: stream.read(CHUNK), b""):
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
        except (OSError, http.client.HTTPException) as e:
            raise GalenInputError(f"download of {url} interrupted after {offset + received} bytes "
                                  f"({type(e).__name__}: {e}); run again to resume from {part}") from e
        if remaining is not None and received < remaining:
            raise GalenInputError(f"download of {url} stopped after {offset + received} of {offset + remaining} "
                                  f"bytes; run again to resume from {part}")
    size = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and size != expected_size:
        part.unlink(missing_ok=True)
        raise GalenInputError(f"{url}: got {size} bytes, expected {expected_size}; the download was deleted, "
                              "run again (or check the URL: the file may have changed upstream)")
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected:
            actual = file_hash(part, algorithm)
            if actual != expected.lower():
                part.unlink()
                raise GalenInputError(f"{url}: {algorithm} mismatch: expected {expected.lower()}, got {actual}; "
                                      "the download was deleted. The file changed upstream or was corrupted in "
                                      "transit: run again, and if it persists, check the source")
    part.replace(dest)  # dest appears only complete and verified
    return dest


# --- extraction ---------------------------------------------------------------------------------

def _member_target(root: Path, name: str, archive: Path) -> Path:
    """Where `name` extracts to under `root`; refuses names that would escape it."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or PureWindowsPath(name).drive or PurePosixPath(clean).is_absolute():
        raise GalenInputError(f"{archive.name}: member {name!r} has an absolute path; refusing to extract")
    if ".." in PurePosixPath(clean).parts:
        raise GalenInputError(f"{archive.name}: member {name!r} climbs out with '..'; refusing to extract")
    target = (root / clean).resolve()
    if target != root and root not in target.parents:
        raise GalenInputError(f"{archive.name}: member {name!r} would land outside {root}; refusing to extract")
    return target


def _copy(src: IO[bytes], target: Path, limits: IngestLimits, what: str) -> None:
    """Stream one member to `target`, counting the bytes: a member that inflates past the limit
    (whatever its header declared) stops there and its partial file is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with src, target.open("wb") as out:
            while block := src.read(CHUNK):
                written += len(block)
                if written > limits.max_member_bytes:
                    raise GalenInputError(limits.refusal(f"{what} decompressed (counted while extracting)",
                                                         f"more than {limits.max_member_bytes:,} bytes",
                                                         "max_member_bytes") + "; refusing to extract")
                out.write(block)
    except (GalenInputError, OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error) as e:
        target.unlink(missing_ok=True)
        if isinstance(e, GalenInputError):
            raise
        raise GalenInputError(f"{what} cannot be extracted ({type(e).__name__}: {e}); a corrupt archive (e.g. a "
                              "member longer or shorter than it declares) must be re-downloaded") from e


def _check_member(limits: IngestLimits, archive: Path, name: str, size: int, count: int) -> None:
    """Refuse, before anything is written, an archive of too many members or a member declared too big."""
    if count > limits.max_members:
        raise GalenInputError(limits.refusal(f"{archive}: its member count", f"more than {limits.max_members:,} members",
                                             "max_members", "members") + "; refusing to extract")
    if size > limits.max_member_bytes:
        raise GalenInputError(limits.refusal(f"{archive}: member {name!r} declares a decompressed size that", size,
                                             "max_member_bytes") + "; refusing to extract")


def extract(archive: Path, dest: Path, limits: IngestLimits | None = None) -> Path:
    """Unpack a .zip or .tar(.gz/.bz2/.xz) into `dest`; every member is checked before anything is written.

    `limits` (default: params.yaml `ingest.limits`) bound each member's decompressed size and the
    number of members."""
    archive, dest = Path(archive), Path(dest)
    limits = resolve(limits)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            plan = []
            for count, info in enumerate(zf.infolist(), start=1):
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise GalenInputError(f"{archive.name}: member {info.filename!r} is a symlink; refusing to extract")
                _check_member(limits, archive, info.filename, info.file_size, count)
                plan.append((info, _member_target(root, info.filename, archive)))
            for info, target in plan:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    _copy(zf.open(info), target, limits, f"{archive}: member {info.filename!r}")
        return dest
    if name.endswith(TAR_SUFFIXES):
        try:
            with tarfile.open(archive) as tf:
                plan = []
                count = 0
                while (member := tf.next()) is not None:  # one header at a time: the count is checked as it grows
                    count += 1
                    if member.issym() or member.islnk():
                        raise GalenInputError(f"{archive.name}: member {member.name!r} is a link; refusing to extract")
                    if not (member.isfile() or member.isdir()):
                        raise GalenInputError(f"{archive.name}: member {member.name!r} is not a file or folder; "
                                              "refusing to extract")
                    _check_member(limits, archive, member.name, member.size, count)
                    plan.append((member, _member_target(root, member.name, archive)))
                for member, target in plan:
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                    else:
                        _copy(tf.extractfile(member), target, limits,  # type: ignore[arg-type] - regular file
                              f"{archive}: member {member.name!r}")
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise GalenInputError(f"{archive} is not a readable tar archive ({type(e).__name__}: {e}); "
                                  "re-download it") from e
        return dest
    raise GalenInputError(f"{archive.name}: can only extract .zip and .tar(.gz/.bz2/.xz) archives")


# --- where public datasets live -----------------------------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    url: str
    filename: str
    sha256: str | None = None  # None: not known for certain (see the dataset's note); never guessed
    md5: str | None = None     # only where the publisher itself publishes an MD5
    extract: bool = False


@dataclass(frozen=True)
class PublicDataset:
    name: str
    format: str                      # the `galen ingest --format` that reads it
    homepage: str
    license: str
    files: tuple[RemoteFile, ...] = ()
    credentialed: bool = False       # True: never downloaded here; pass a local path
    note: str = ""


_HF = "https://huggingface.co/datasets"
PUBLIC_DATASETS: dict[str, PublicDataset] = {d.name: d for d in (
    PublicDataset(
        "vqa-rad", "vqa-rad", "https://osf.io/89kps/", "CC0 1.0",
        # OSF builds this zip of the whole project storage on request: its bytes (and so any checksum)
        # are not stable, so there is no sha256 to pin.
        (RemoteFile("https://files.osf.io/v1/resources/89kps/providers/osfstorage/?zip=", "vqa_rad_osf.zip",
                    extract=True),),
        note="OSF storage as one zip ('VQA_RAD Dataset Public.json' + 'VQA_RAD Image Folder')"),
    PublicDataset(
        "slake", "slake", "https://www.med-vqa.com/slake/", "CC BY 4.0",
        # sha256 unknown for these hub files: None
        tuple(RemoteFile(f"{_HF}/BoKelvin/SLAKE/resolve/main/{f}", f, extract=f.endswith(".zip"))
              for f in ("imgs.zip", "train.json", "validation.json", "test.json")),
        note="Hugging Face mirror BoKelvin/SLAKE of SLAKE 1.0"),
    PublicDataset(
        "pathvqa", "pathvqa", f"{_HF}/flaviagiammarino/path-vqa", "MIT (Hugging Face card of the PathVQA mirror)",
        note="Parquet shards named data/<split>-NNNNN-of-NNNNN-<hash>.parquet; the names and checksums are not "
             "known here, so fetch them with `huggingface-cli download flaviagiammarino/path-vqa --repo-type dataset` "
             "and pass the folder"),
    PublicDataset(
        "medmnist", "medmnist", "https://zenodo.org/records/10519652", "CC BY 4.0 (per-subset licences apply)",
        note="one <flag>[_<size>].npz per subset; URLs and the publisher's MD5s come from the medmnist package "
             "(see medmnist_files); no sha256 is published"),
    PublicDataset(
        "iu-xray", "r2gen", "https://github.com/zhjohnchan/R2Gen",
        "Open-i Indiana University chest X-ray collection terms",
        # sha256 unknown: None. Google Drive answers large files with a confirmation page (caught as HTML).
        (RemoteFile("https://drive.google.com/uc?export=download&id=1c0BXEuDy8Cmm2jfN0YYGkQxFZd2ZIoLg", "iu_xray.zip",
                    extract=True),),
        note="R2Gen's preprocessed IU X-ray (annotation.json + images/); if Drive returns its confirmation page, "
             "download in a browser and pass the local path"),
    PublicDataset(
        "roco", "roco", "https://github.com/razorx89/roco-dataset", "PMC Open Access subset (per-article licences)",
        note="captions ship in the GitHub repository; images are fetched from PubMed Central by the repository's "
             "own script, so there is no single file to download here"),
    PublicDataset(
        "meqsum", "meqsum", "https://github.com/abachaa/MeQSum",
        "MeQSum (Ben Abacha & Demner-Fushman 2019), research use",
        # sha256 not verified here: None
        (RemoteFile("https://github.com/abachaa/MeQSum/raw/master/MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx",
                    "MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx"),)),
    PublicDataset(
        "mimic-cxr", "r2gen", "https://physionet.org/content/mimic-cxr-jpg/2.1.0/",
        "PhysioNet Credentialed Health Data License 1.5.0", credentialed=True,
        note="credentialed (PhysioNet training + data use agreement): download it yourself and pass the local path"),
    PublicDataset(
        "mednli", "mednli", "https://physionet.org/content/mednli/1.0.0/",
        "PhysioNet Credentialed Health Data License 1.5.0", credentialed=True,
        note="credentialed (PhysioNet): download mli_{train,dev,test}_v1.jsonl yourself and pass the local folder"),
)}


def medmnist_files(flags: list[str] | None = None, size: int | None = None) -> list[RemoteFile]:
    """MedMNIST files with the URLs and MD5s the medmnist package publishes (size None/28, 64, 128, 224)."""
    try:
        import medmnist
    except ImportError as e:
        raise GalenInputError("MedMNIST URLs come from the medmnist package; run `pip install medmnist`") from e
    suffix = "" if size in (None, 28) else f"_{size}"
    out = []
    for flag in flags or list(medmnist.INFO):
        info: dict[str, Any] = medmnist.INFO.get(flag)
        if info is None:
            raise GalenInputError(f"unknown MedMNIST flag {flag!r}; known: {', '.join(medmnist.INFO)}")
        if f"url{suffix}" not in info:
            raise GalenInputError(f"MedMNIST {flag} has no size {size} (sizes: 28, 64, 128, 224)")
        out.append(RemoteFile(info[f"url{suffix}"], f"{flag}{suffix}.npz", md5=info.get(f"MD5{suffix}")))
    return out


def fetch(name: str, dest_dir: Path, *, flags: list[str] | None = None, size: int | None = None,
          timeout: float = 60, limits: IngestLimits | None = None) -> Path:
    """Download (and unpack) one entry of PUBLIC_DATASETS into `dest_dir`; returns the folder to ingest."""
    if name not in PUBLIC_DATASETS:
        raise GalenInputError(f"unknown dataset {name!r}; downloadable: {', '.join(sorted(PUBLIC_DATASETS))}")
    entry = PUBLIC_DATASETS[name]
    if entry.credentialed:
        raise GalenInputError(f"{name} is credentialed ({entry.homepage}): {entry.note}")
    files = medmnist_files(flags, size) if name == "medmnist" else list(entry.files)
    if not files:
        raise GalenInputError(f"{name} has no direct download: {entry.note} ({entry.homepage})")
    dest_dir = Path(dest_dir)
    for remote in files:
        path = download(remote.url, dest_dir / remote.filename, remote.sha256, md5=remote.md5, timeout=timeout)
        if remote.extract:
            extract(path, dest_dir, limits)
    return dest_dir
