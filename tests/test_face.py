"""The face embedder on real faces that installed packages ship: scikit-image's astronaut (Eileen Collins)
and matplotlib's grace_hopper.jpg. No network; dlib's models load once per module (and are cached by path).

Images are decoded through ``memtrack.data.dataset.open_image`` -- the path training images take -- so grayscale,
CMYK and EXIF-rotated files are covered as users' files would be.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

pytest.importorskip("dlib")

from memtrack.data.dataset import open_image  # noqa: E402
from memtrack.embedders.registry import get_embedder  # noqa: E402
from memtrack.embedders import face as face_module
from memtrack.embedders import face_backends
from memtrack.embedders.face import FaceEmbedder, FaceOptions, dlib_model_dir  # noqa: E402
from memtrack.errors import ConfigError, DependencyError  # noqa: E402
from memtrack.identity.detect import identity_interpolation, identity_leak  # noqa: E402


def _png(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def people() -> dict:
    import matplotlib.cbook as cbook
    import skimage.data

    return {"astronaut": open_image(_png(Image.fromarray(skimage.data.astronaut()))),
            "hopper": open_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))}


@pytest.fixture(scope="module")
def face() -> FaceEmbedder:
    return FaceEmbedder()


@pytest.fixture(scope="module")
def reference(face, people):
    """The training set: one original photo per person. Returns (vectors [2, 128], aligned chips [2])."""
    aligned = face.detect_and_align([people["astronaut"], people["hopper"]])
    first = np.unique(aligned.image_index, return_index=True)[1]  # the top-scoring face of each image
    chips = aligned.chips[first]
    return face.embed_chips(chips), chips


def _against(reference_vectors, query):
    """Both identity detectors with the whole (two-face) training set as every face's candidates."""
    q = np.atleast_2d(query)
    cands = np.repeat(reference_vectors[None], len(q), 0)
    ident = np.repeat(np.arange(len(reference_vectors))[None], len(q), 0)
    return identity_leak(q, cands, ident, 0.6), identity_interpolation(q, cands, ident, 0.6)


def _augment(image: Image.Image) -> list:
    w, h = image.size
    return [image.crop((w // 12, h // 12, w - w // 20, h - h // 10)), image.rotate(8, resample=Image.BICUBIC),
            image.rotate(-6, resample=Image.BICUBIC), ImageEnhance.Brightness(image).enhance(1.3),
            ImageEnhance.Brightness(image).enhance(0.7), ImageOps.mirror(image),
            image.resize((w * 3 // 5, h * 3 // 5), Image.Resampling.BICUBIC)]


def test_registered_with_a_fingerprint_that_names_the_models(face):
    emb = get_embedder({"name": "face"})
    assert isinstance(emb, FaceEmbedder)
    assert (emb.metric, emb.dim, emb.chip_size, emb.published_threshold) == ("l2", 128, 150, 0.6)
    fp = emb.fingerprint
    path = dlib_model_dir() / "dlib_face_recognition_resnet_model_v1.dat"
    assert fp["model_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert {fp["backend"], fp["align"], fp["detector"]} == {"dlib", "detect", "hog"}
    other = FaceEmbedder(FaceOptions(upsample=0)).fingerprint
    assert other["upsample"] == 0 and other != fp


def test_augmented_copies_are_leaks_of_that_person(face, people, reference):
    ref, _ = reference
    names = list(people)
    for k, name in enumerate(names):
        vecs = face.embed(_augment(people[name]))
        leak, interp = _against(ref, vecs)
        assert leak.flagged.all(), (name, leak.score)
        assert not interp.flagged.any()
        assert (leak.extra["identity"] == k).all()
        assert leak.score.max() < 0.3 and leak.extra["d2"].min() > 0.6  # measured 0.00-0.22 / 0.66-0.71


def test_pixel_morphs_blend_identities_and_are_not_leaks(face, reference):
    ref, chips = reference
    a, h = chips.astype(np.float64)
    morph = lambda w: np.round(w * a + (1 - w) * h).astype(np.uint8)  # noqa: E731  w = share of the astronaut
    vecs = face.embed_chips(np.stack([morph(0.5), morph(0.6), morph(0.35), morph(0.2)]))
    leak, interp = _against(ref, vecs)
    assert interp.flagged[:2].all() and not leak.flagged[:2].any()
    assert {tuple(sorted(p)) for p in zip(interp.extra["identity_a"][:2], interp.extra["identity_b"][:2])} == {(0, 1)}
    # mostly one person: verified as Hopper only (35/65: 0.64 / 0.29; 20/80: 0.67 / 0.16) -> a leak of Hopper
    assert leak.flagged[2:].all() and not interp.flagged[2:].any()
    assert (leak.extra["identity"][2:] == 1).all()


def test_images_without_faces_give_no_face(face):
    import skimage.data

    images = [Image.fromarray(skimage.data.coffee()), Image.fromarray(skimage.data.rocket())]
    batch = face.embed_faces(images)
    assert batch.vectors.shape == (0, 128) and batch.counts().tolist() == [0, 0]
    rows = face.embed(images)
    assert rows.shape == (2, 128) and np.isnan(rows).all()
    leak, interp = _against(np.zeros((2, 128), np.float32), rows)
    assert not leak.flagged.any() and np.isnan(leak.score).all() and leak.extra["n_faces"].tolist() == [0, 0]
    assert not interp.flagged.any()


def test_every_face_of_an_image_is_embedded(face, people, reference):
    ref, _ = reference
    astro = people["astronaut"].crop((110, 0, 360, 300))  # her head, without the mission patch
    hopper = people["hopper"].crop((100, 60, 450, 480)).resize((250, 300))
    pair = Image.new("RGB", (500, 300))
    pair.paste(astro, (0, 0)), pair.paste(hopper, (250, 0))
    batch = face.embed_faces([pair, astro])
    assert batch.counts().tolist() == [2, 1]
    assert (np.diff(batch.scores[:2]) <= 0).all()  # best first
    who = np.argmin(face.distance(batch.vectors[:2, None], ref[None]), axis=1)
    left = batch.boxes[:2, 2] <= 250
    assert sorted(who.tolist()) == [0, 1] and (who[left] == 0).all() and (who[~left] == 1).all()
    np.testing.assert_array_equal(face.embed([pair])[0], batch.vectors[0])  # embed: the top-scoring face


def test_assume_aligned_small_crops_keep_identity(reference):
    ref, chips = reference
    aligned = FaceEmbedder(FaceOptions(align="assume_aligned"))
    small = [Image.fromarray(c).resize((s, s), Image.Resampling.BICUBIC) for s in (32, 48, 64) for c in chips]
    vecs = aligned.embed(small)
    d = aligned.distance(vecs[:, None], ref[None])  # [6, 2]
    own = np.tile([0, 1], 3)
    assert (d[np.arange(6), own] < 0.45).all() and (d[np.arange(6), 1 - own] > 0.6).all()  # 32 px: 0.35-0.39
    leak, _ = _against(ref, vecs)
    assert leak.flagged.all() and (leak.extra["identity"] == own).all()
    assert np.isnan(aligned.embed([Image.fromarray(chips[0]).resize((16, 16))])).all()  # < min_face (20)
    assert aligned.fingerprint["align"] == "assume_aligned" and "detector" not in aligned.fingerprint


def test_assume_aligned_verifies_that_an_image_is_a_face(reference):
    import skimage.data

    ref, chips = reference
    faces = [Image.fromarray(c).resize((32, 32), Image.Resampling.BICUBIC) for c in chips]
    scenes = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB").resize((32, 32)) for n in ("coffee", "chelsea", "rocket")]
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(60, 200, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    checked = FaceEmbedder(FaceOptions(align="assume_aligned"))
    batch = checked.embed_faces(faces + scenes + noise)
    assert batch.image_index.tolist() == [0, 1]  # the two face chips; no scene, no noise image
    assert np.isfinite(batch.scores).all()  # the detector's scores, not NaN
    unchecked = FaceEmbedder(FaceOptions(align="assume_aligned", verify=False))
    assert unchecked.embed_faces(faces + scenes + noise).image_index.tolist() == list(range(13))
    np.testing.assert_allclose(unchecked.embed(faces), checked.embed(faces), atol=1e-6)  # same chips, same vectors
    assert checked.fingerprint["verify"]["size"] == 160 and unchecked.fingerprint["verify"] is False
    assert checked.fingerprint != unchecked.fingerprint  # an index built one way refuses the other


def test_grayscale_cmyk_exif_rotated_and_tiny_files(face, people, reference):
    ref, _ = reference
    hopper = people["hopper"]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated = _png(hopper.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes(), quality=95)
    files = [_png(hopper.convert("L")), _png(hopper.convert("CMYK"), "JPEG", quality=95), rotated,
             _png(hopper.resize((12, 14)))]
    vecs = face.embed([open_image(f) for f in files])
    d = face.distance(vecs[:3], ref[1])
    assert (d < 0.25).all(), d  # measured 0.12 / 0.14 / 0.11
    assert np.isnan(vecs[3]).all()
    assert face.embed_faces([Image.open(io.BytesIO(rotated))]).counts().tolist() == [0]  # EXIF ignored: no face


def test_chips_batches_and_single_images_agree(face, people):
    imgs = [people["hopper"], people["astronaut"]]
    batch = face.embed_faces(imgs)
    np.testing.assert_allclose(batch.vectors, face.embed_chips(face.detect_and_align(imgs).chips), atol=1e-6)
    np.testing.assert_allclose(face.embed([imgs[0]])[0], face.embed(imgs)[0], atol=1e-6)
    assert batch.to_dict()["n_images"] == 2
    with pytest.raises(ValueError, match=r"\[m, 150, 150, 3\]"):
        face.embed_chips(np.zeros((1, 112, 112, 3), np.uint8))


def test_missing_dlib_names_the_extra(monkeypatch):
    monkeypatch.setattr(face_module, "is_dlib_available", lambda: False)
    with pytest.raises(DependencyError) as err:
        FaceEmbedder()
    assert "memtrack[face]" in str(err.value)


@pytest.mark.parametrize("options, match", [
    ({"backend": "arcface"}, "model_path"),
    ({"backend": "arcface", "model_path": "/nonexistent/w600k_r50.onnx"}, "not found"),
    ({"upsample": 9}, "upsample"),
    ({"device": "cuda"}, "CPU only"),
    ({"backend": "magic"}, "backend"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_options_are_refused_with_advice(options, match):
    with pytest.raises(ConfigError, match=match):
        get_embedder({"name": "face", **options})


# ---------------------------------------------------------------------------------------- ArcFace


def _tiny_arcface(path, batch="N", dim=32, seed=0):
    """A random ONNX model with ArcFace's interface: [N, 3, 112, 112] -> [N, dim]."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(0, 0.1, (4, 3, 16, 16)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(0, 0.1, (4 * 7 * 7, dim)).astype(np.float32), "fc")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input.1", "w"], ["c"], strides=[16, 16]),
         helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
         helper.make_node("MatMul", ["f", "fc"], ["683"])],
        "tiny_arcface", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [batch, dim])], [w, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_arcface_onnx_path_with_a_tiny_random_model(tmp_path, people):
    pytest.importorskip("onnxruntime")
    path = _tiny_arcface(tmp_path / "w600k_tiny.onnx")
    arc = get_embedder({"name": "face", "backend": "arcface", "model_path": str(path)})
    assert (arc.metric, arc.dim, arc.chip_size, arc.published_threshold) == ("cosine", 32, 112, 1.2)
    imgs = [people["hopper"], people["astronaut"]]
    batch = arc.embed_faces(imgs)
    assert batch.vectors.shape[1] == 32 and batch.counts().tolist()[0] == 1
    np.testing.assert_allclose(np.linalg.norm(batch.vectors, axis=1), 1.0, atol=1e-5)
    aligned = arc.detect_and_align(imgs)
    assert aligned.chips.shape[1:] == (112, 112, 3) and aligned.chips[0].std() > 20  # a real crop, not padding
    np.testing.assert_allclose(arc.embed([imgs[0]])[0], batch.vectors[0], atol=1e-5)
    fp = arc.fingerprint
    assert fp["model_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and fp["backend"] == "arcface"
    assert fp["landmarks"] == "shape_predictor_68_face_landmarks.dat"
    fixed = FaceEmbedder(FaceOptions(backend="arcface", model_path=str(_tiny_arcface(tmp_path / "b1.onnx", 1)),
                                     align="assume_aligned"))
    np.testing.assert_allclose(fixed.embed_chips(aligned.chips[:2]),
                               np.concatenate([fixed.embed_chips(aligned.chips[i:i + 1]) for i in range(2)]), atol=1e-5)


def test_arcface_alignment_puts_landmarks_on_the_template():
    rng = np.random.default_rng(0)
    src = face_backends.ARCFACE_TEMPLATE + rng.normal(0, 1.0, (5, 2))
    theta, scale, shift = 0.3, 2.5, np.array([40.0, -7.0])
    rot = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    m = face_backends._similarity(src @ rot.T + shift, src)
    np.testing.assert_allclose((src @ rot.T + shift) @ m[:, :2].T + m[:, 2], src, atol=1e-9)


def test_arcface_refuses_a_model_of_the_wrong_shape(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "flat.onnx"))
    with pytest.raises(ConfigError, match=r"\[N, 3, S, S\]"):
        FaceEmbedder(FaceOptions(backend="arcface", model_path=str(tmp_path / "flat.onnx")))


# ---------------------------------------------------------------------------------------- FaceNet


def test_facenet_missing_package_is_a_dependency_error(monkeypatch, tmp_path):
    monkeypatch.setattr(face_module, "is_facenet_available", lambda: False)
    with pytest.raises(DependencyError, match="facenet-pytorch"):
        FaceEmbedder(FaceOptions(backend="facenet", model_path=str(tmp_path / "w.pt")))


def test_facenet_with_random_weights(tmp_path, people):
    if not face_module.is_facenet_available():
        pytest.skip("facenet-pytorch is not installed (pip install --no-deps facenet-pytorch)")
    import torch
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    state = InceptionResnetV1(pretrained=None).state_dict()
    state["logits.weight"], state["logits.bias"] = torch.zeros(4, 512), torch.zeros(4)  # like the VGGFace2 file
    torch.save(state, tmp_path / "facenet.pt")
    net = FaceEmbedder(FaceOptions(backend="facenet", model_path=str(tmp_path / "facenet.pt")))
    vecs = net.embed([people["hopper"]])
    assert vecs.shape == (1, 512) and net.metric == "cosine" and net.chip_size == 160
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_cnn_detector_finds_the_same_person(people, reference):
    ref, _ = reference
    cnn = FaceEmbedder(FaceOptions(detector="cnn", upsample=0))
    vecs = cnn.embed([people["hopper"].resize((256, 300))])
    assert cnn.distance(vecs[0], ref[1]) < 0.25 and cnn.fingerprint["detector"] == "cnn"  # measured 0.13
