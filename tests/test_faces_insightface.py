"""omg/faces.py's detection through the real insightface + onnxruntime, on constructed models in antelopev2's layout
(tests/fake_antelopev2.py): a detector whose faces are known, so the keypoints omg returns check its colour order,
det_size and scaling; a random recognition model, so the embedding checks the aligned crop insightface takes."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omg import faces as facelib

for _module in ("onnx", "onnxruntime", "insightface"):
    pytest.importorskip(_module, reason=f"face detection tests need {_module} (setup.py's test extra installs it)")

import onnxruntime  # noqa: E402
from insightface.utils import face_align  # noqa: E402

from fake_antelopev2 import DET_SIZE, DETECTOR, RECOGNIZER, FakeFace, write_antelopev2  # noqa: E402

# one face in the detector's 640x640 input frame; every value on a 1/4 grid, so the decoding is exact
FACE = FakeFace(bbox=(100.0, 60.0, 260.0, 260.0),
                kps=((140.0, 120.0), (220.0, 120.0), (180.0, 160.0), (150.0, 210.0), (210.0, 210.0)))
# a second face far from the first (no overlap for the NMS), at another stride and anchor
OTHER = FakeFace(bbox=(400.0, 300.0, 560.0, 500.0),
                 kps=((440.0, 360.0), (520.0, 360.0), (480.0, 400.0), (450.0, 450.0), (510.0, 450.0)),
                 stride=16, anchor=1, score=0.8)


@pytest.fixture(autouse=True)
def _fresh_analysers(monkeypatch):
    """Each test builds its FaceAnalysis anew (a few ms): omg caches one per folder, which would hide how a test's
    working directory or files are read."""
    monkeypatch.setattr(facelib, "_ANALYSERS", {})


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The model folders, built once: one face, two faces, none, and a detector without a recognizer."""
    root = tmp_path_factory.mktemp("insightface")
    return {"one": write_antelopev2(root / "one", [FACE]),
            "two": write_antelopev2(root / "two", [FACE, OTHER]),
            "none": write_antelopev2(root / "none", []),
            "detector only": write_antelopev2(root / "detector_only", [FACE], recognizer=False)}


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Colour noise: every channel differs, so a swapped colour order changes the aligned crop's embedding."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def in_photo(kps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Detector-frame points in the photo's pixels: insightface letterboxes the photo, longer side to DET_SIZE."""
    return np.asarray(kps, np.float32) * (max(size) / DET_SIZE)


def reference_embedding(folder: Path, image: Image.Image, kps: np.ndarray) -> np.ndarray:
    """The recognizer run by hand on insightface's aligned crop of the BGR photo (norm_crop), preprocessed as its
    ArcFaceONNX does for a non-mxnet model: back to RGB, (x - 127.5) / 127.5, NCHW."""
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    crop = face_align.norm_crop(bgr, landmark=np.asarray(kps, np.float32), image_size=112)
    blob = ((crop[:, :, ::-1].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    session = onnxruntime.InferenceSession(str(folder / RECOGNIZER), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(blob)})[0][0]


def test_the_fake_folder_is_routed_as_antelopev2_is(folders):
    """insightface's model zoo takes the constructed files for what the real ones are: an SCRFD detector (2.x's
    SCRFD; 0.7.3 routes it to RetinaFace, the same decoding) and ArcFaceONNX with glintr100's normalisation (not
    the mxnet one)."""
    app = facelib.face_analysis(str(folders["one"]))
    kinds = {k: type(v).__name__ for k, v in app.models.items()}
    assert kinds["detection"] in ("SCRFD", "RetinaFace") and kinds["recognition"] == "ArcFaceONNX", kinds
    assert sorted(kinds) == ["detection", "recognition"]
    assert app.models["detection"].use_kps and app.det_size == (640, 640)
    rec = app.models["recognition"]
    assert (rec.input_mean, rec.input_std, rec.input_size) == (127.5, 127.5, (112, 112))
    assert facelib.face_analysis(str(folders["one"])) is app  # one analyser per folder


@pytest.mark.parametrize("size, as_file", [((640, 480), True), ((480, 800), False), ((1280, 720), False)],
                         ids=["640x480-file", "480x800", "1280x720"])
def test_a_photo_gives_the_detected_keypoints_and_the_crops_embedding(folders, tmp_path, size, as_file):
    image = photo(*size)
    if as_file:  # through load_face's file branch (PNG: lossless, so the pixels are the ones compared below)
        image.save(tmp_path / "reference.png")
        face = facelib.load_face(str(tmp_path / "reference.png"), str(folders["one"]))
    else:
        face = facelib.load_face(image, str(folders["one"]))
    kps = in_photo(FACE.kps, size)
    np.testing.assert_allclose(face.keypoints, kps, atol=1e-3)
    assert face.keypoints.shape == (5, 2) and face.keypoints.dtype == np.float32
    expected = reference_embedding(folders["one"], image, kps)
    assert face.embedding.shape == (512,)
    np.testing.assert_allclose(face.embedding.numpy(), expected, rtol=1e-4, atol=1e-4)
    # the check above can tell the colour orders apart: the same crop of the RGB array embeds elsewhere
    swapped = reference_embedding(folders["one"], Image.fromarray(np.asarray(image)[:, :, ::-1]), kps)
    assert not np.allclose(swapped, expected, rtol=1e-2, atol=1e-2)


def test_detect_faces_gives_every_face_in_photo_pixels(folders):
    size = (480, 800)
    found = facelib.detect_faces(photo(*size), str(folders["two"]))
    assert len(found) == 2
    by_x = sorted(found, key=lambda f: f["bbox"][0])  # the detector's order is by score
    for f, fake in zip(by_x, (FACE, OTHER)):
        np.testing.assert_allclose(f["bbox"], in_photo(np.reshape(fake.bbox, (2, 2)), size).reshape(4), atol=1e-3)
        np.testing.assert_allclose(f["kps"], in_photo(fake.kps, size), atol=1e-3)
        assert f["embedding"].shape == (512,) and f["embedding"].dtype == np.float32


@pytest.mark.parametrize("which, message", [("two", "2 faces found in the reference photo"),
                                            ("none", "no face found in the reference photo")])
def test_a_photo_without_exactly_one_face_is_refused(folders, which, message):
    with pytest.raises(facelib.FaceError, match=message):
        facelib.load_face(photo(640, 480), str(folders[which]))


def test_the_models_can_be_in_any_folder(folders, tmp_path):
    """insightface looks for ROOT/models/NAME; omg hands it the folder itself, so no 'models' parent is needed."""
    folder = tmp_path / "my antelope"
    folder.mkdir()
    for name in (DETECTOR, RECOGNIZER):
        (folder / name).write_bytes((folders["one"] / name).read_bytes())
    face = facelib.load_face(photo(640, 480), str(folder))
    np.testing.assert_allclose(face.keypoints, in_photo(FACE.kps, (640, 480)), atol=1e-3)


def test_an_antelopev2_folder_in_the_working_directory_does_not_shadow_face_models(folders, tmp_path,
                                                                                 monkeypatch):
    """insightface 2.x resolves FaceAnalysis(name="antelopev2") in the working directory before ROOT/models: with
    the name alone, ./antelopev2 (here: a detector that finds nothing) would replace the folder the user gave."""
    write_antelopev2(tmp_path, [], name="antelopev2")
    monkeypatch.chdir(tmp_path / "models")
    face = facelib.load_face(photo(640, 480), str(folders["one"]))
    np.testing.assert_allclose(face.keypoints, in_photo(FACE.kps, (640, 480)), atol=1e-3)
    with pytest.raises(facelib.FaceError, match="no face found"):  # a relative face_models is the cwd's, as asked
        facelib.load_face(photo(640, 480), "antelopev2")


def test_folders_without_usable_models_are_face_errors(folders, tmp_path):
    only_recognizer = tmp_path / "only_recognizer"
    only_recognizer.mkdir()
    (only_recognizer / RECOGNIZER).write_bytes((folders["one"] / RECOGNIZER).read_bytes())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / DETECTOR).write_bytes(b"not an onnx file")
    cases = [(tmp_path / "missing", "is no folder of antelopev2 .onnx models"),
             (tmp_path, "is no folder of antelopev2 .onnx models"),  # the models are in subfolders, not here
             (only_recognizer, "no face detector among the .onnx files"),
             (folders["detector only"], "no face recognition model among the .onnx files"),
             (broken, "insightface cannot load the models")]
    for folder, message in cases:
        with pytest.raises(facelib.FaceError, match=message):
            facelib.load_face(photo(64, 64), str(folder))


def test_check_face_source_loads_the_models_before_sampling(folders, tmp_path):
    photo(64, 64).save(tmp_path / "reference.jpg")
    facelib.check_face_source(str(tmp_path / "reference.jpg"), str(folders["one"]))  # no detection yet: no error
    with pytest.raises(facelib.FaceError, match="no face recognition model"):
        facelib.check_face_source(str(tmp_path / "reference.jpg"), str(folders["detector only"]))
