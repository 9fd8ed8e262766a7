"""Shard stage: validated rows -> per task/split Parquet shards that Ray Data reads for training.

Images are resized once here and re-encoded, so training workers never decode full-size scans. The
size is not a setting of this stage: it is the input size of the models the pipeline trains, which
each model's config decides (`model_input_sizes`: the generalist's `train.size` or `init` folder,
CLIP's `clip.train.config`); the manifest records which models the shards were written for, and a
model reading shards written for another size is refused (`check_written_for`), never resized; boxes (grounding, detection) are rescaled with their image, since a
record's boxes are in pixels of the image it stores (the pre-resize size and boxes stay in `meta`).
Closed answer sets (VQA answer lists from the training answers, class names, NLI answers) are
written to `candidates.json` for trie decoding and trie-aware label smoothing, and
`manifest.json` records counts and the task-mixture weights. Input files are
processed in parallel by a process pool (`workers`), one task per input shard.
"""

from __future__ import annotations

import io
import json
from collections import Counter, defaultdict
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from galen.flows.ingest.schema import ARROW_SCHEMA, from_row, image_sha1, to_row
from galen.flows.outputs import replacing_output
from galen.model.errors import GalenInputError
from galen.model.tasks import NLI_ANSWERS


@dataclass
class ShardConfig:
    """params.yaml `shards:`, and the models the shards are written for."""

    models: dict[str, int] = field(default_factory=dict)  # model (generalist, clip) -> its input size
    image_format: str = "png"           # png (lossless) or jpeg
    jpeg_quality: int = 95
    rows_per_shard: int = 1024
    workers: int = 1
    mixture: dict[str, float] = field(default_factory=dict)  # task -> sampling weight in training

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ShardConfig:
        """The `shards:` section of params.yaml, for the models the rest of params.yaml trains."""
        section = dict(params.get("shards") or {})
        known = set(cls.__dataclass_fields__) - {"models"}
        unknown = sorted(set(section) - known)
        if unknown:
            hint = (" (the image size is not set here any more: it is the input size of the models trained, "
                    "train.size and clip.train.config)") if "image_size" in unknown else ""
            raise GalenInputError(f"unknown shards params {unknown}; known: {sorted(known)}{hint}")
        cfg = cls(models=model_input_sizes(params), **section)
        if cfg.image_format not in ("png", "jpeg"):
            raise GalenInputError(f"shards.image_format must be png or jpeg, got {cfg.image_format!r}")
        bad = {t: w for t, w in cfg.mixture.items() if not isinstance(w, (int, float)) or w < 0}
        if bad:
            raise GalenInputError(f"shards.mixture weights must be numbers >= 0, got {bad}")
        return cfg

    @property
    def image_size(self) -> int:
        """The size every image is written at: the largest input among the models (a smaller model's
        own preprocessing resizes down, as it does every image it is served)."""
        if not self.models:
            raise GalenInputError("no model to write the shards for: give ShardConfig(models={'generalist': 128}) "
                                  "or params with train.size / clip.train.config")
        return max(self.models.values())


def model_input_sizes(params: Mapping[str, Any]) -> dict[str, int]:
    """The input size of each model params.yaml trains, from the models' own configs: the generalist's
    named `size` (train.size, or a stage's own), or its `init` folder's config.json unless that folder
    is what pretraining writes; CLIP's named `clip.train.config` or its `init` folder. The keys read
    here are the shards stage's params in dvc.yaml."""
    from galen.model.clip import CONFIGS, ClipSpec, read_spec
    from galen.model.config import GalenConfig, get_config
    from galen.model.errors import GalenError

    sizes: dict[str, int] = {}
    train = params.get("train") or {}
    stages = {name: {**train, **(train.get(name) or {})} for name in ("pretrain", "finetune")}
    written = {stage.get("out") for stage in stages.values()}
    generalist = {}
    try:
        for name, stage in stages.items():
            if stage.get("init") and stage["init"] not in written:
                config = Path(stage["init"]) / "config.json"
                if not config.is_file():
                    raise GalenInputError(f"train.{name}.init={stage['init']} is not a Galen model folder (no "
                                          "config.json)")
                generalist[name] = GalenConfig.load(config).image_size
            elif stage.get("size"):
                generalist[name] = get_config(stage["size"]).image_size
        clip = (params.get("clip") or {}).get("train") or {}
        if clip.get("init"):
            sizes["clip"] = read_spec(Path(clip["init"])).image_size
        elif clip.get("config") in CONFIGS:
            sizes["clip"] = ClipSpec(clip["config"], CONFIGS[clip["config"]]).image_size
    except GalenError as e:
        raise GalenInputError(f"cannot tell the models' input size for the shards: {e}") from e
    if len(set(generalist.values())) > 1:
        raise GalenInputError(f"the generalist's stages take different image sizes ({generalist}); one set of shards "
                              "serves them: give them one size (train.size, or init folders of one image_size)")
    if generalist:
        sizes["generalist"] = next(iter(generalist.values()))
    return sizes


def check_written_for(shards_dir: str | Path, model: str, size: int, what: str) -> None:
    """A model reads shards written for it: their images at its input size, as its config says
    (evaluation and serving resize to the same size). Shards written for another size are refused
    instead of resized."""
    path = Path(shards_dir) / "manifest.json"
    try:
        written = json.loads(path.read_text()).get("models")
    except (OSError, ValueError, AttributeError) as e:
        raise GalenInputError(f"{path} is unreadable ({e}); run `dvc repro shards`") from e
    if not isinstance(written, dict):
        raise GalenInputError(f"the shards under {shards_dir} do not say which models they were written for "
                              "(written by an older Galen); re-run `dvc repro shards`")
    if written.get(model) != size:
        have = ", ".join(f"{k} {v} px" for k, v in sorted(written.items())) or "no model"
        raise GalenInputError(
            f"the shards under {shards_dir} were written for {have}, but {what} takes {size} px images; write "
            f"shards for it: `dvc repro shards` (the stage sizes images for the models params.yaml trains: "
            f"train.size or train.<stage>.init, clip.train.config or clip.train.init), or `galen shards` with "
            f"those params")


def resize_image(data: bytes, size: int, fmt: str, quality: int) -> bytes:
    """Square resize (bicubic, RGB) and re-encode, as the model's preprocessing expects."""
    return resize_image_with_size(data, size, fmt, quality)[0]


def resize_image_with_size(data: bytes, size: int, fmt: str, quality: int) -> tuple[bytes, tuple[int, int]]:
    """`resize_image`, plus the (width, height) the image had before (what its boxes were measured in)."""
    with Image.open(io.BytesIO(data)) as img:
        original = img.size
        img = img.convert("RGB").resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG" if fmt == "png" else "JPEG", quality=quality)
    return buf.getvalue(), original


def scale_boxes(boxes: list[list[float]], original: tuple[int, int], size: int) -> list[list[float]]:
    """Pixel boxes of a (width, height) image -> the same boxes in pixels of its size x size resize
    (x scales by size/width, y by size/height; clipped to the image against float round-off)."""
    sx, sy = size / original[0], size / original[1]
    return [[min(max(x0 * sx, 0.0), size), min(max(y0 * sy, 0.0), size),
             min(max(x1 * sx, 0.0), size), min(max(y1 * sy, 0.0), size)] for x0, y0, x1, y1 in boxes]


def _process_file(args: tuple[str, int, str, dict, int]) -> list[Path]:
    """One row group of a validated shard -> rows written to per task/split part files of this job."""
    src, row_group, out_dir, cfg_dict, file_index = args
    cfg = ShardConfig(**cfg_dict)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    written: list[Path] = []

    def flush(key: tuple[str, str]) -> None:
        task, split = key
        folder = Path(out_dir) / task / split
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"part-{file_index:05d}-{len([p for p in written if p.parent == folder]):04d}.parquet"
        pq.write_table(pa.Table.from_pylist(groups[key], schema=ARROW_SCHEMA), path, compression="zstd")
        written.append(path)
        groups[key] = []

    for row in pq.ParquetFile(src).read_row_group(row_group).to_pylist():
        rec = from_row(row)
        if rec.image is not None:
            rec.meta["original_image_sha1"] = image_sha1(rec.image)  # key of the image-code table
            size = cfg.image_size
            rec.image, original = resize_image_with_size(rec.image, size, cfg.image_format, cfg.jpeg_quality)
            rec.meta["original_size"] = list(original)
            if rec.boxes:  # boxes are in pixels of the stored image: they follow it through the resize
                rec.meta["original_boxes"] = rec.boxes
                rec.boxes = scale_boxes(rec.boxes, original, size)
        key = (rec.task, rec.split)
        groups[key].append(to_row(rec))
        if len(groups[key]) >= cfg.rows_per_shard:
            flush(key)
    for key in list(groups):
        if groups[key]:
            flush(key)
    return written


LABEL_COLUMNS = ["task", "split", "dataset", "target", "candidates"]


def closed_answer_sets(rows: list[dict]) -> dict[str, dict[str, list[str]]]:
    """Per dataset and task, the candidate answers used by trie decoding and trie-aware smoothing
    (rows need only LABEL_COLUMNS)."""
    sets: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r in rows:
        if r["task"] == "vqa" and r["split"] == "train":
            sets[r["dataset"]]["vqa"].add(r["target"].strip().lower())
        elif r["task"] == "classification" and r["candidates"]:
            sets[r["dataset"]]["classification"].update(r["candidates"])
        elif r["task"] == "nli":
            sets[r["dataset"]]["nli"].update(NLI_ANSWERS)
    return {d: {t: sorted(v) for t, v in tasks.items()} for d, tasks in sorted(sets.items())}


SHARD_FILES = ("manifest.json", "candidates.json", "*/*/part-*.parquet")  # the marker first (galen.flows.outputs)


def build_shards(validated_dir: str | Path, out_dir: str | Path, cfg: ShardConfig) -> dict:
    src = Path(validated_dir)
    files = sorted(p for p in src.glob("part-*.parquet"))
    if not files:
        raise GalenInputError(f"no validated shards in {src}; run the validate stage first")
    # written whole into a temporary folder that replaces `out_dir` at the end (galen.flows.outputs): never
    # mixed with a previous run's shards, never over files this stage did not write
    with replacing_output(out_dir, command="galen shards", inputs=[src], owned=SHARD_FILES) as out:
        groups = [(f, g) for f in files for g in range(pq.ParquetFile(f).num_row_groups)]
        jobs = [(str(f), g, str(out), cfg.__dict__, i) for i, (f, g) in enumerate(groups)]
        if cfg.workers > 1:
            with ProcessPoolExecutor(cfg.workers) as pool:
                written = [p for ps in pool.map(_process_file, jobs) for p in ps]
        else:
            written = [p for job in jobs for p in _process_file(job)]
        rows = [r for f in files for r in pq.read_table(f, columns=LABEL_COLUMNS).to_pylist()]  # no image bytes
        counts = Counter(f"{r['task']}/{r['split']}" for r in rows)
        candidates = closed_answer_sets(rows)
        (out / "candidates.json").write_text(json.dumps(candidates, indent=2, sort_keys=True) + "\n")
        tasks = sorted({r["task"] for r in rows})
        mixture = {t: float(cfg.mixture.get(t, 1.0)) for t in tasks}
        manifest = {"shards": len(written), "rows": len(rows), "by_task_split": dict(sorted(counts.items())),
                    "image_size": cfg.image_size, "models": dict(sorted(cfg.models.items())),
                    "image_format": cfg.image_format,
                    "mixture": mixture}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def shard_paths(shards_dir: str | Path, task: str, split: str) -> list[str]:
    """Parquet files of one task/split, for `ray.data.read_parquet`."""
    return sorted(str(p) for p in (Path(shards_dir) / task / split).glob("*.parquet"))
