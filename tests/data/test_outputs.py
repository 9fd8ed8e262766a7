"""Stage outputs are atomic and owned (galen.flows.outputs): ingest, validate, shards and image-codes write
into a temporary folder beside their output and rename it into place at the end, refuse an output that
overlaps one of their inputs or holds files they did not write, and leave the previous output whole when
they fail. Driven through `galen.flows.cli.main`, as a user runs the stages."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, UnidentifiedImageError

from galen.flows.cli import main
from galen.flows.ingest import ingest
from galen.flows.ingest.schema import Record, ShardWriter, read_records
from galen.model.errors import GalenInputError

PARAMS = {"validate": {"max_bad_fraction": 1.0}, "shards": {"workers": 1, "rows_per_shard": 4},
          "train": {"size": "nano"}, "image_codes": {"num_codes": 8}}


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (i * 37 % 256, i * 11 % 256, 90)).save(buf, format="PNG")
    return buf.getvalue()


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    """Temporary or set-aside copies of `out` beside it (`.<name>.tmp-*`, `.<name>.old-*`)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def vqa_rad(folder: Path, n: int, testset: str | None = None) -> Path:
    """A VQA-RAD layout with n training questions, each on its own image (and `testset.json` as given)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / "images" / f"{i}.png").write_bytes(png(i))
    rows = [{"qid": i, "image_name": f"{i}.png", "question": f"is there a mass {i}?", "answer": "yes"}
            for i in range(n)]
    (folder / "trainset.json").write_text(json.dumps(rows))
    if testset is not None:
        (folder / "testset.json").write_text(testset)
    return folder


def mednli(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"pairID": f"p{i}", "sentence1": f"premise {i}", "sentence2": f"hypothesis {i}",
                         "gold_label": "entailment"}) for i in range(n)]
    (folder / "mli_train_v1.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with a params.yaml, as `galen` is run from a project's root."""
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def galen(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str]:
    """(return code, stderr) of `galen ARGV`; stderr must be empty or one line."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc in (0, 2) and err.count("\n") == (rc == 2), (rc, err)
    assert rc == 0 or err.startswith("galen: error: "), err
    return rc, err


def ingested(project: Path, capsys: pytest.CaptureFixture) -> tuple[Path, Path]:
    """Two datasets ingested by `galen ingest`: vqa-rad (4 image questions) and mednli (3 pairs)."""
    a, b = project / "data" / "ingested" / "vqa_rad", project / "data" / "ingested" / "mednli"
    assert galen(capsys, "ingest", "--format", "vqa-rad", "--source", vqa_rad(project / "raw" / "vqa", 4),
                 "--out", a)[0] == 0
    assert galen(capsys, "ingest", "--format", "mednli", "--source", mednli(project / "raw" / "mednli", 3),
                 "--out", b)[0] == 0
    return a, b


# ---------------------------------------------------------------- an output never overlaps an input

@pytest.mark.parametrize("where, how", [("a", "is its input"), ("a/validated", "is inside its input"),
                                        (".", "contains its input")])
def test_validate_out_overlapping_an_input_exits_2_and_the_input_is_untouched(project, capsys, where, how):
    a, b = ingested(project, capsys)
    before = {p: tree(p) for p in (a, b)}
    out = {"a": a, "a/validated": a / "validated", ".": a.parent}[where]
    rc, err = galen(capsys, "validate", "--inputs", a, b, "--out", out, "--report", project / "report.json")
    assert rc == 2 and how in err and "--out" in err and str(a) in err, err
    assert {p: tree(p) for p in (a, b)} == before  # same files, same bytes
    assert not (a / "validated").exists() and not (project / "report.json").exists()
    assert leftovers(out) == [] and leftovers(a) == []


def test_validate_report_inside_an_input_is_refused(project, capsys):
    a, b = ingested(project, capsys)
    before = tree(a)
    rc, err = galen(capsys, "validate", "--inputs", a, b, "--out", project / "validated", "--report", a / "r.json")
    assert rc == 2 and "--report" in err and "is inside its input" in err, err
    assert tree(a) == before and not (project / "validated").exists()


def test_ingest_out_inside_its_source_is_refused(project, capsys):
    source = vqa_rad(project / "raw" / "vqa", 2)
    before = tree(source)
    rc, err = galen(capsys, "ingest", "--format", "vqa-rad", "--source", source, "--out", source / "ingested")
    assert rc == 2 and "is inside its input" in err, err
    assert tree(source) == before


def test_shards_and_image_codes_outputs_inside_their_input_are_refused(project, capsys):
    a, b = ingested(project, capsys)
    validated = project / "data" / "validated"
    assert galen(capsys, "validate", "--inputs", a, b, "--out", validated)[0] == 0
    before = tree(validated)
    for argv in (["shards", "--validated", validated, "--out", validated],
                 ["shards", "--validated", validated, "--out", validated / "shards"],
                 ["image-codes", "train", "--data", validated, "--out", validated / "codes"],
                 ["image-codes", "encode", "--data", validated, "--codes", project / "codes",
                  "--out", validated / "codes.parquet"]):
        rc, err = galen(capsys, *argv)
        assert rc == 2 and "its input" in err and str(validated) in err, (argv, err)
        assert tree(validated) == before, argv


# ---------------------------------------------------------------- files a stage did not write

def test_validate_refuses_an_out_folder_with_a_foreign_file_and_keeps_it(project, capsys):
    a, b = ingested(project, capsys)
    out = project / "data" / "validated"
    assert galen(capsys, "validate", "--inputs", a, b, "--out", out)[0] == 0
    shutil.copy(a / "part-00000.parquet", out / "mine.parquet")  # a Parquet file validate did not write
    before = tree(out)
    rc, err = galen(capsys, "validate", "--inputs", a, b, "--out", out)
    assert rc == 2 and "mine.parquet" in err and "choose another --out or remove them" in err, err
    assert tree(out) == before and leftovers(out) == []


@pytest.mark.parametrize("stage", ["ingest", "validate", "shards", "image-codes train"])
def test_a_folder_that_is_not_the_stage_output_is_refused_naming_its_files(project, capsys, stage):
    a, b = ingested(project, capsys)
    validated = project / "data" / "validated"
    assert galen(capsys, "validate", "--inputs", a, b, "--out", validated)[0] == 0
    out = project / "mine"
    out.mkdir()
    names = [f"notes-{i}.txt" for i in range(7)]
    for name in names:
        (out / name).write_text("mine\n")
    shutil.copy(a / "part-00000.parquet", out / "part-00000.parquet")  # even files named like the stage's own
    before = tree(out)
    argv = {"ingest": ["ingest", "--format", "mednli", "--source", project / "raw" / "mednli", "--out", out],
            "validate": ["validate", "--inputs", a, b, "--out", out],
            "shards": ["shards", "--validated", validated, "--out", out],
            "image-codes train": ["image-codes", "train", "--data", validated, "--out", out]}[stage]
    rc, err = galen(capsys, *argv)
    assert rc == 2 and "did not write" in err and "notes-0.txt" in err and "and 3 more" in err, err
    assert "remove them" in err
    assert tree(out) == before and leftovers(out) == []


def test_encode_refuses_to_overwrite_a_file_it_did_not_write(project, capsys):
    a, b = ingested(project, capsys)
    validated = project / "data" / "validated"
    assert galen(capsys, "validate", "--inputs", a, b, "--out", validated)[0] == 0
    theirs = project / "table.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), theirs)
    before = theirs.read_bytes()
    rc, err = galen(capsys, "image-codes", "encode", "--data", validated, "--codes", project / "codes",
                    "--out", theirs)
    assert rc == 2 and "not a file" in err and str(theirs) in err, err
    assert theirs.read_bytes() == before and leftovers(theirs) == []


# ---------------------------------------------------------------- replaced whole, or not at all

def test_reingest_into_a_used_folder_reads_back_exactly_the_new_rows(project, capsys):
    out = project / "ingested"
    ingest("vqa-rad", vqa_rad(project / "big", 52), out, rows_per_shard=4)  # 13 shards
    assert len(list(out.glob("part-*.parquet"))) == 13
    rc, _ = galen(capsys, "ingest", "--format", "vqa-rad", "--source", vqa_rad(project / "small", 5), "--out", out)
    assert rc == 0
    summary = json.loads((out / "ingest.json").read_text())
    back = list(read_records(out))
    assert summary["records"] == len(back) == 5
    assert sorted(r.source_id for r in back) == [str(i) for i in range(5)]
    assert sorted(p.name for p in out.iterdir()) == ["ingest.json", "part-00000.parquet"]
    assert leftovers(out) == []


def test_ingest_failing_midway_leaves_the_previous_output_and_no_temp_folder(project, capsys):
    out = project / "ingested"
    source = vqa_rad(project / "vqa", 6)
    assert galen(capsys, "ingest", "--format", "vqa-rad", "--source", source, "--out", out)[0] == 0
    before = tree(out)
    # the training questions are read (and, 1 row a shard, written) before the broken test split is reached
    (source / "testset.json").write_text('[{"qid": 1, "image_name": "0.png"')
    with pytest.raises(GalenInputError, match="testset.json is not valid JSON"):
        ingest("vqa-rad", source, out, rows_per_shard=1)
    assert tree(out) == before and leftovers(out) == []
    rc, err = galen(capsys, "ingest", "--format", "vqa-rad", "--source", source, "--out", out)
    assert rc == 2 and "testset.json is not valid JSON" in err, err
    assert tree(out) == before and leftovers(out) == []


def test_validate_failing_midway_leaves_the_previous_output_and_report(project, capsys):
    a, b = ingested(project, capsys)
    out, report = project / "data" / "validated", project / "metrics" / "data_report.json"
    assert galen(capsys, "validate", "--inputs", a, b, "--out", out, "--report", report)[0] == 0
    before, report_before = tree(out), report.read_bytes()
    broken = project / "data" / "ingested" / "broken"
    with ShardWriter(broken) as writer:  # a real shard, then a real but truncated one
        writer.write(Record("nli", "train", "mednli", "x", target="yes", premise="p", hypothesis="h"))
    data = (broken / "part-00000.parquet").read_bytes()
    (broken / "part-00001.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(pa.ArrowInvalid):
        main(["validate", "--inputs", str(a), str(b), str(broken), "--out", str(out), "--report", str(report)])
    assert tree(out) == before and report.read_bytes() == report_before
    assert leftovers(out) == [] and leftovers(report) == []


def test_shards_failing_midway_leaves_the_previous_output_and_no_temp_folder(project, capsys):
    a, b = ingested(project, capsys)
    validated, out = project / "data" / "validated", project / "data" / "shards"
    assert galen(capsys, "validate", "--inputs", b, "--out", validated)[0] == 0
    assert galen(capsys, "shards", "--validated", validated, "--out", out)[0] == 0  # the NLI pairs alone
    before = tree(out)
    assert galen(capsys, "validate", "--inputs", a, b, "--out", validated)[0] == 0
    # a second input shard whose image does not decode: the first shard's rows are written, then this fails
    with ShardWriter(project / "bad") as writer:
        writer.write(Record("vqa", "train", "demo", "bad", image=b"not an image", question="q?", target="yes"))
    shutil.copy(project / "bad" / "part-00000.parquet", validated / "part-00001.parquet")
    with pytest.raises(UnidentifiedImageError):
        main(["shards", "--validated", str(validated), "--out", str(out)])
    assert tree(out) == before and leftovers(out) == []


def test_rerunning_replaces_the_output_whole(project, capsys):
    a, b = ingested(project, capsys)
    validated, out = project / "data" / "validated", project / "data" / "shards"
    assert galen(capsys, "validate", "--inputs", a, b, "--out", validated)[0] == 0
    assert galen(capsys, "shards", "--validated", validated, "--out", out)[0] == 0
    assert (out / "vqa" / "train").is_dir() and (out / "nli" / "train").is_dir()
    assert json.loads((validated / "report.json").read_text())["valid"] == 7

    # the same stages on the NLI pairs alone: nothing of the first run is left beside the second's
    assert galen(capsys, "validate", "--inputs", b, "--out", validated)[0] == 0
    assert json.loads((validated / "report.json").read_text())["valid"] == len(list(read_records(validated))) == 3
    assert galen(capsys, "shards", "--validated", validated, "--out", out)[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["by_task_split"] == {"nli/train": 3}
    assert sorted(p.name for p in out.iterdir()) == ["candidates.json", "manifest.json", "nli"]
    assert sum(len(list(read_records(p))) for p in out.rglob("*.parquet")) == manifest["rows"] == 3
    assert leftovers(out) == [] and leftovers(validated) == []


def test_report_inside_the_out_folder_is_written_with_it(project, capsys):
    a, b = ingested(project, capsys)
    out = project / "data" / "validated"
    for _ in range(2):  # the second run replaces the first, its own report included
        rc, _ = galen(capsys, "validate", "--inputs", a, b, "--out", out, "--report", out / "counts" / "r.json")
        assert rc == 0
    assert json.loads((out / "counts" / "r.json").read_text())["rows"] == 7
    assert sorted(tree(out)) == ["counts/r.json", "part-00000.parquet", "quarantine.parquet"]


def test_an_absent_or_empty_output_is_written(project, capsys):
    """What `dvc repro` leaves before it runs a stage: no output (and no parent folder), or an empty one."""
    a, b = ingested(project, capsys)
    out = project / "new" / "deep" / "validated"
    assert galen(capsys, "validate", "--inputs", a, b, "--out", out)[0] == 0
    empty = project / "empty"
    empty.mkdir()
    assert galen(capsys, "validate", "--inputs", a, b, "--out", empty)[0] == 0
    assert tree(out) == tree(empty)
