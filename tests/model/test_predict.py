"""GalenPredictor: every task through one API, every accepted image form, every bad input refused
with a clear message. A random-weight nano model: the answers mean nothing, the plumbing is real."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from galen.model.errors import GalenInputError
from galen.model.predict import GalenPredictor, PredictConfig, Prediction
from galen.model.vision import decode_dicom, load_image
from tests.conftest import nano

SHORT = {"vqa": {"beam_size": 2, "max_length": 6}, "caption": {"beam_size": 2, "max_length": 8},
         "summarization": {"beam_size": 2, "max_length": 8, "length_penalty": 0.7}}


@pytest.fixture(scope="module")
def predictor(demo_tokenizer) -> GalenPredictor:
    model = nano(vocab_size=len(demo_tokenizer))
    return GalenPredictor(model, demo_tokenizer, PredictConfig.from_dict(SHORT))


def scan(seed: int = 0, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A grey radiograph-like image (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8))


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def dicom_bytes(frames: np.ndarray, *, slope: float = 1.0, intercept: float = -1024.0, center: float = 40.0,
                width: float = 400.0, photometric: str = "MONOCHROME2", transfer_syntax: str | None = None,
                pixel_data: bytes | None = None) -> bytes:
    """A minimal CT DICOM file (uint16 stored values) written by pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ct = "1.2.840.10008.5.1.4.1.1.2"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ct
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["galen-test"])
    ds.file_meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ct, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    frames = frames if frames.ndim == 3 else frames[None]
    if frames.shape[0] > 1:
        ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.WindowCenter, ds.WindowWidth = center, width
    if pixel_data is not None:
        ds.PixelData = pixel_data
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = np.ascontiguousarray(frames.astype("<u2")).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------

STORED = np.array([[0, 1000], [2000, 3000]], dtype=np.uint16)
# HU = stored - 1024 -> [-1024, -24, 976, 1976]; window 40/400 (DICOM LINEAR): below -160 -> 0, above 239 -> 1,
# -24 -> (-24 - 39.5) / 399 + 0.5 = 0.34085 -> 86.9 -> 87
WINDOWED = np.array([[0, 87], [255, 255]], dtype=np.uint8)


def test_dicom_bytes_decode_with_rescale_and_window_like_a_hand_computation():
    assert np.array_equal(np.asarray(load_image(dicom_bytes(STORED))), WINDOWED)
    inverted = np.asarray(load_image(dicom_bytes(STORED, photometric="MONOCHROME1")))
    assert np.array_equal(inverted, 255 - WINDOWED)                   # MONOCHROME1: low values are bright
    frames = np.stack([np.zeros_like(STORED), STORED, np.full_like(STORED, 3000)])
    assert np.array_equal(decode_dicom(dicom_bytes(frames)), WINDOWED)  # multi-frame: the middle frame


def test_dicom_served_is_the_image_ingest_trained_on(tmp_path):
    """Serving must see a scan exactly as training saw it: decode_dicom(bytes) == the PNG ingest wrote."""
    from PIL import Image

    from galen.flows.ingest.dicom import read

    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        folder = tmp_path / photometric
        folder.mkdir()
        data = dicom_bytes(STORED * 1 + 17, photometric=photometric, center=300, width=2000)
        (folder / "scan.dcm").write_bytes(data)
        records = list(read(folder))
        assert len(records) == 1 and records[0].image is not None
        ingested = np.asarray(Image.open(io.BytesIO(records[0].image)).convert("L"))
        served = np.asarray(Image.fromarray(decode_dicom(data)).convert("L"))
        assert np.array_equal(served, ingested)


def test_compressed_dicom_without_a_decoder_names_the_transfer_syntax():
    from pydicom.encaps import encapsulate

    data = dicom_bytes(STORED, transfer_syntax="1.2.840.10008.1.2.4.90", pixel_data=encapsulate([b"\0" * 16]))
    with pytest.raises(GalenInputError, match=r"JPEG 2000.*pip install"):
        load_image(data)


def test_every_image_form_gives_the_same_answer(predictor):
    img = scan(1)
    png = encoded(img)
    forms = [img, np.asarray(img), png, bytearray(png), base64.b64encode(png).decode(),
             "data:image/png;base64," + base64.b64encode(png).decode()]
    got = [predictor.classify([f], ["nodule", "normal", "effusion"])[0] for f in forms]
    assert all(g == got[0] for g in got), got
    jpeg = predictor.classify([encoded(img.convert("RGB"), "JPEG")], ["nodule", "normal", "effusion"])[0]
    assert jpeg.answer in ("nodule", "normal", "effusion")             # JPEG decodes (lossy: scores may differ)


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------

def test_closed_sets_answer_from_their_candidates_with_probabilities(predictor):
    labels = ["adipose", "lymphocytes", "mucus", "normal colon mucosa"]
    out = predictor.classify([scan(i) for i in range(3)], labels)
    for p in out:
        assert p.task == "classification" and p.answer in labels
        assert list(p.scores) == labels and sum(p.scores.values()) == pytest.approx(1.0)
    per_image = predictor.classify([scan(0), scan(1)], [["a b", "c"], ["yes", "no", "maybe"]])
    assert per_image[0].answer in ("a b", "c") and set(per_image[1].scores) == {"yes", "no", "maybe"}

    nli = predictor.nli(["the patient has a fever"], ["the patient is unwell"])[0]
    assert nli.answer in ("maybe", "yes", "no") and sum(nli.scores.values()) == pytest.approx(1.0)

    vqa = predictor.vqa([scan(0), scan(1)], ["Is there a nodule", "which side?"], [["yes", "no"], None])
    assert vqa[0].answer in ("yes", "no") and isinstance(vqa[1].answer, str) and vqa[1].scores is None


def test_all_candidates_mode_answers_the_argmax_of_the_scores(demo_tokenizer):
    cfg = PredictConfig.from_dict({**SHORT, "closed_set_mode": "all"})
    pred = GalenPredictor(nano(vocab_size=len(demo_tokenizer)), demo_tokenizer, cfg)
    for p in pred.classify([scan(i) for i in range(4)], ["one", "two", "three", "zero"]):
        assert p.answer == max(p.scores, key=p.scores.get)


def test_grounding_returns_four_bins_as_a_box_in_the_original_pixels(predictor):
    assert predictor.tokenizer.num_bins == 1000                        # coordinate = bin / 999 * side
    for size in ((200, 100), (64, 320)):
        p = predictor.ground([scan(2, size)], ["the left lung"])[0]
        bins = [int(t[len("<bin_"):-1]) for t in p.answer.split()]
        assert len(bins) == 4 and p.task == "grounding"
        w, h = size
        coords = [bins[0] / 999 * w, bins[1] / 999 * h, bins[2] / 999 * w, bins[3] / 999 * h]
        expected = (min(coords[0], coords[2]), min(coords[1], coords[3]), max(coords[0], coords[2]),
                    max(coords[1], coords[3]))
        assert p.box == pytest.approx(expected)
        assert 0 <= p.box[0] <= p.box[2] <= w and 0 <= p.box[1] <= p.box[3] <= h


def test_free_text_tasks_return_text(predictor):
    cap = predictor.caption([scan(3)])[0]
    summ = predictor.summarize(["the patient asks whether aspirin can be taken with ibuprofen every day"])[0]
    assert cap.task == "caption" and isinstance(cap.answer, str)
    assert summ.task == "summarization" and isinstance(summ.answer, str)


def test_predict_groups_requests_and_returns_them_in_order(predictor):
    img0, img1 = encoded(scan(0)), encoded(scan(1))
    requests = [
        {"task": "nli", "premise": "no fever", "hypothesis": "the patient has a fever"},
        {"task": "vqa", "image": img0, "question": "is there a nodule?", "candidates": ["yes", "no"]},
        {"task": "classification", "image": img1, "labels": ["a", "b"]},
        {"task": "vqa", "image": img1, "question": "is the lesion large?", "candidates": ["yes", "no"]},
        {"task": "grounding", "image": img0, "text": "the nodule"},
        {"task": "vqa", "image": img1, "question": "what modality?"},
        {"task": "nli", "premise": "fever", "hypothesis": "no fever", "image": None},   # None fields are absent
    ]
    out = predictor.predict(requests)
    assert [o["task"] for o in out] == [r["task"] for r in requests]
    # the same answers as the per-task methods on the same groups (same batches)
    nli = predictor.nli(["no fever", "fever"], ["the patient has a fever", "no fever"])
    closed = predictor.vqa([img0, img1], ["is there a nodule?", "is the lesion large?"], ["yes", "no"])
    assert [out[0], out[6]] == [p.to_dict() for p in nli]
    assert [out[1], out[3]] == [p.to_dict() for p in closed]
    assert out[2] == predictor.classify([img1], ["a", "b"])[0].to_dict()
    assert out[4] == predictor.ground([img0], ["the nodule"])[0].to_dict()
    assert out[5] == predictor.vqa([img1], ["what modality?"])[0].to_dict()
    assert json.loads(json.dumps(out)) == out                           # JSON-ready


def test_batch_size_does_not_change_answers(demo_tokenizer):
    model = nano(vocab_size=len(demo_tokenizer))
    images = [scan(i) for i in range(5)]
    labels = ["adipose", "lymphocytes", "mucus"]
    one = GalenPredictor(model, demo_tokenizer, PredictConfig.from_dict({**SHORT, "max_batch_size": 1}))
    many = GalenPredictor(model, demo_tokenizer, PredictConfig.from_dict({**SHORT, "max_batch_size": 16}))
    a, b = one.classify(images, labels), many.classify(images, labels)
    assert [p.answer for p in a] == [p.answer for p in b]
    for p, q in zip(a, b):
        assert p.scores == pytest.approx(q.scores, abs=1e-5)


def test_load_reads_a_saved_model_folder(tmp_path, demo_tokenizer):
    model = nano(vocab_size=len(demo_tokenizer))
    model.save_pretrained(tmp_path / "m", demo_tokenizer)
    loaded = GalenPredictor.load(tmp_path / "m", PredictConfig.from_dict(SHORT))
    direct = GalenPredictor(model, demo_tokenizer, PredictConfig.from_dict(SHORT))
    assert loaded.nli(["a fever"], ["sick"]) == direct.nli(["a fever"], ["sick"])
    assert loaded.image_size == model.cfg.image_size == 128


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("request_, message", [
    ({"task": "vqa", "image": "IMG", "question": "  ?"}, "question is empty"),
    ({"task": "vqa", "image": "IMG"}, "missing question"),
    ({"task": "classification", "image": "IMG", "labels": []}, "label set is empty"),
    ({"task": "classification", "image": "IMG", "labels": ["a", "b", "a"]}, r"duplicate labels \['a'\]"),
    ({"task": "classification", "image": "IMG", "labels": ["a", " "]}, "empty label"),
    ({"task": "classification", "image": "IMG", "labels": "a"}, "must be a list of strings"),
    ({"task": "vqa", "image": b"not an image", "question": "q?"}, "cannot be decoded"),
    ({"task": "vqa", "image": b"", "question": "q?"}, "empty"),
    ({"task": "vqa", "image": "%%% not base64", "question": "q?"}, "not valid base64"),
    ({"task": "vqa", "image": 3, "question": "q?"}, "PIL image, a uint8 array or encoded bytes"),
    ({"task": "vqa", "image": np.zeros((8, 8), np.float32), "question": "q?"}, "not uint8"),
    ({"task": "segment", "image": "IMG"}, "unknown task 'segment'"),
    ({"task": "nli", "premise": "a", "hypothesis": "b", "question": "c"}, r"unknown fields \['question'\]"),
    ({"task": "grounding", "image": "IMG", "text": ""}, "text is empty"),
    ({"task": "summarization", "text": 5}, "text must be a string"),
])
def test_bad_requests_fail_before_any_model_work(predictor, request_, message):
    good = {"task": "nli", "premise": "a", "hypothesis": "b"}
    request_ = {k: (encoded(scan(0)) if isinstance(v, str) and v == "IMG" else v) for k, v in request_.items()}
    with pytest.raises(GalenInputError, match=message) as info:
        predictor.predict([good, request_])
    assert "request 1" in str(info.value)                              # says which request


def test_images_over_the_pixel_limit_are_refused_before_decoding(demo_tokenizer):
    pred = GalenPredictor(nano(vocab_size=len(demo_tokenizer)), demo_tokenizer,
                          PredictConfig.from_dict({**SHORT, "max_image_pixels": 50 * 50}))
    for form in (encoded(scan(0, (60, 50))), scan(0, (60, 50)), np.zeros((50, 60), np.uint8),
                 dicom_bytes(np.zeros((50, 60), np.uint16))):
        with pytest.raises(GalenInputError, match="3,000 pixels, over the limit of 2,500"):
            pred.vqa([form], ["is it large?"], ["yes", "no"])
    assert pred.vqa([encoded(scan(0, (50, 50)))], ["is it large?"], ["yes", "no"])[0].answer in ("yes", "no")


def test_bad_batches_and_configs_are_refused(predictor):
    with pytest.raises(GalenInputError, match="different lengths"):
        predictor.vqa([scan(0)], ["a?", "b?"])
    with pytest.raises(GalenInputError, match="empty batch"):
        predictor.caption([])
    with pytest.raises(GalenInputError, match="non-empty list of requests"):
        predictor.predict([])
    with pytest.raises(GalenInputError, match="non-empty list of requests"):
        predictor.predict({"task": "nli"})
    with pytest.raises(GalenInputError, match="one list of strings for the whole batch or one list per sample"):
        predictor.classify([scan(0), scan(1)], [["a", "b"]])
    with pytest.raises(GalenInputError, match="unknown predict config keys"):
        PredictConfig.from_dict({"beam": 3})
    with pytest.raises(GalenInputError, match="unknown generation keys"):
        PredictConfig.from_dict({"caption": {"beams": 3}})
    with pytest.raises(GalenInputError, match="closed_set_mode"):
        PredictConfig(closed_set_mode="greedy")
    cfg = PredictConfig.from_dict(SHORT)
    assert PredictConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_a_tokenizer_of_another_model_is_refused(demo_tokenizer):
    with pytest.raises(GalenInputError, match="load the tokenizer saved with the model"):
        GalenPredictor(nano(vocab_size=len(demo_tokenizer) + 1), demo_tokenizer)


def test_prediction_to_dict_keeps_only_what_the_task_has():
    assert Prediction("vqa", "yes").to_dict() == {"task": "vqa", "answer": "yes"}
    assert Prediction("grounding", "<bin_1>", box=(1.0, 2.0, 3.0, 4.0)).to_dict()["box"] == [1.0, 2.0, 3.0, 4.0]


def test_token_lattice_allows_one_token_per_position_then_eos():
    from galen.model.decoding import TokenLattice

    lattice = TokenLattice([[5, 6], [7]], eos_id=2)
    assert sorted(lattice.root) == [5, 6] and lattice.root[5] is lattice.root[6]   # levels are shared
    assert list(lattice.root[6]) == [7] and lattice.root[6][7] == {2: {}}
    with pytest.raises(GalenInputError, match="at least one allowed token"):
        TokenLattice([[5], []], eos_id=2)
    with pytest.raises(GalenInputError, match="eos id 2 cannot be"):
        TokenLattice([[2, 5]], eos_id=2)


@pytest.mark.parametrize("text, max_bytes, code, words", [
    ("iVBORw0KGgo$$$not-base64", None, "invalid_base64", "not valid base64"),
    ("data:image/png,rawbytes", None, "invalid_base64", "data: URL without base64"),
    ("", None, "invalid_image", "is empty"),
    (base64.b64encode(b"x" * 4000).decode(), 1000, "image_too_large", "over the limit of 1,000 bytes"),
])
def test_the_one_request_image_decoder_names_what_is_wrong(text, max_bytes, code, words):
    from galen.model.errors import GalenInputError
    from galen.model.vision import ImageDecodeError, decode_base64_image

    with pytest.raises(ImageDecodeError, match=words) as info:
        decode_base64_image(text, max_bytes, what="image")
    assert info.value.code == code and isinstance(info.value, GalenInputError)


def test_the_request_image_decoder_takes_data_urls_and_line_breaks():
    from galen.model.vision import decode_base64_image

    data = bytes(range(256)) * 3
    encoded = base64.b64encode(data).decode()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    assert decode_base64_image(encoded) == data
    assert decode_base64_image(f"data:image/png;base64,{wrapped}", max_bytes=len(data)) == data
