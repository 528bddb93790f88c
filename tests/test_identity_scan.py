"""Identity end to end: the face space of a real index (the demo's real faces), check, and the summary."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("dlib")

from memtrack.scan.check import check_folder  # noqa: E402
from memtrack.config import Config, EmbedderSpec  # noqa: E402
from memtrack.data.dataset import read_dataset  # noqa: E402
from memtrack.demo.train import build_demo_dataset  # noqa: E402
from memtrack.embedders.registry import get_embedder  # noqa: E402
from memtrack.index.reference import ReferenceIndex  # noqa: E402
from memtrack.analysis.summary import identities_block  # noqa: E402


@pytest.fixture(scope="module")
def face_ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    data = build_demo_dataset(root / "data", 32)
    cfg = Config()
    cfg.index.embedders = [EmbedderSpec("pixel", {"resolution": 32}), EmbedderSpec("face", {"align": "assume_aligned"})]
    ReferenceIndex.build(read_dataset(data), [get_embedder(s) for s in cfg.index.embedders], root / "ref", cfg)
    return data, root / "ref"


def test_face_space_holds_only_the_labelled_faces(face_ref):
    data, ref_dir = face_ref
    ref = ReferenceIndex.open(ref_dir)
    labelled = [i for i, r in enumerate(ref.records) if r.identity]
    assert sorted(ref.spaces["face"].rows.tolist()) == labelled  # scenes are not faces
    ident = ref.manifest["identity"]
    assert ident["names"] == ["Eileen Collins", "Grace Hopper"] and ident["groups"]["source"] == "labels"
    cal = ident["calibration"]
    assert cal["source"] == "published" and cal["threshold"] == 0.6 and "genuine pairs" in cal["warning"]
    assert len(cal["genuine"]) == 2 and len(cal["impostor"]) == 4
    base = ref.manifest["baseline"]["face"]
    assert base["statistic"] == "distance to nearest other" and 0.2 < base["p50"] < 0.7  # Euclidean, not RMS


def test_copies_leak_blends_interpolate_scenes_do_neither(face_ref, tmp_path):
    data, ref_dir = face_ref
    gen = tmp_path / "gen"
    gen.mkdir()
    ims = {p.name: Image.open(p).convert("RGB") for p in data.glob("*.png")}
    for name, im in ims.items():
        im.save(gen / f"copy_{name}")
    a = np.asarray(ims["eileen_collins_1.png"], np.float32)
    b = np.asarray(ims["grace_hopper_1.png"], np.float32)
    Image.fromarray(((a + b) / 2).round().astype(np.uint8)).save(gen / "blend.png")
    res = check_folder(gen, ref_dir)
    flags = {i["file"]: i["flags"] for i in res["images"]}
    scores = {i["file"]: i["scores"] for i in res["images"]}
    for name in ims:
        is_face = name.startswith(("eileen", "grace"))
        assert flags[f"copy_{name}"]["identity_leak"] is is_face, name
        assert flags[f"copy_{name}"]["identity_interpolation"] is False, name
        assert flags[f"copy_{name}"]["nn_ratio"] is True, name
    assert scores["copy_eileen_collins_2.png"]["identity_leak.identity_name"] == "Eileen Collins"
    assert scores["copy_grace_hopper_1.png"]["identity_leak.d1"] == 0.0
    assert flags["blend.png"] == {"nn_ratio": False, "nn_ratio_dedup": False, "tiled_l2": False,
                                  "identity_leak": False, "identity_interpolation": True}
    assert res["rates"]["adaptive_l2"]["applicable"] is False  # a handful of training images: n = 50 undefined
    assert {scores["blend.png"]["identity_interpolation.identity_a_name"],
            scores["blend.png"]["identity_interpolation.identity_b_name"]} == {"Eileen Collins", "Grace Hopper"}
    assert res["thresholds"]["identity_leak"]["source"] == "published"


def test_identities_block_first_steps_and_pairs():
    cks = [{"step": 100, "metrics": {"identity_leak": {"identities": [], "identity_counts": {}}}},
           {"step": 200, "metrics": {"identity_leak": {"identities": ["Ada"], "identity_counts": {"Ada": 2}},
                                     "identity_interpolation": {"pairs": ["Ada + Bo"]}}},
           {"step": 300, "metrics": {"identity_leak": {"identities": ["Ada", "Bo"],
                                                       "identity_counts": {"Ada": 1, "Bo": 4}}}}]
    block = identities_block(cks, None)
    assert block["leaked"] == [{"identity": "Ada", "first_step": 200, "checkpoints": 2, "count": 1},
                               {"identity": "Bo", "first_step": 300, "checkpoints": 1, "count": 4}]
    assert block["blended"] == [{"pair": "Ada + Bo", "first_step": 200, "checkpoints": 1}]
    assert [c["metrics"]["distinct_identities"]["count"] for c in cks] == [0, 1, 2]
    assert identities_block([{"step": 1, "metrics": {}}], None) == {}


def _strict(text: str):
    """Parse as JSON the way jq and JavaScript do: the bare words NaN / Infinity are errors."""
    import json

    def refuse(word):
        raise ValueError(f"{word} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_check_json_is_strict_json_when_scores_are_undefined(face_ref, tmp_path, capsys):
    from memtrack.cli.main import main

    data, ref_dir = face_ref
    gen = tmp_path / "gen"
    gen.mkdir()
    Image.open(data / "coffee.png").convert("RGB").save(gen / "scene.png")  # no face: identity scores undefined
    assert main(["check", str(gen), "--index", str(ref_dir), "--json"]) == 0
    out = _strict(capsys.readouterr().out)
    scores = out["images"][0]["scores"]
    assert scores["identity_leak"] is None and scores["nn_ratio"] is not None
