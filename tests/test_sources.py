"""More inputs (issue 6): webdataset .tar shards (img2dataset layout) and parquet lists of local paths."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from conftest import real_image
from memtrack.data.dataset import open_image, read_dataset
from memtrack.embedders.registry import get_embedder
from memtrack.errors import DataError
from memtrack.index.reference import ReferenceIndex

NAMES = ["astronaut", "coffee", "chelsea", "rocket", "camera"]


def jpeg(name: str, size: int = 32) -> bytes:
    buf = io.BytesIO()
    real_image(name).resize((size, size)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shard(path: Path, names: list[str], start: int = 0, extra=None) -> None:
    """img2dataset layout: 000000000.jpg + .txt + .json per sample."""
    with tarfile.open(path, "w") as tf:
        for i, name in enumerate(names, start):
            key = f"{i:09d}"
            add_member(tf, f"{key}.jpg", jpeg(name))
            if i % 2 == 0:
                add_member(tf, f"{key}.txt", f"a photo of {name}".encode())
            add_member(tf, f"{key}.json", json.dumps({"key": key, "caption": f"json {name}",
                                                      "identity": f"id-{name}"}).encode())
        for fn in extra or []:
            fn(tf)


@pytest.fixture()
def wds(tmp_path) -> Path:
    root = tmp_path / "shards"
    root.mkdir()
    write_shard(root / "00000.tar", NAMES[:3], 0)

    def broken(tf):
        add_member(tf, "000000099.jpg", b"\xff\xd8\xff not a jpeg")

    def failed_download(tf):  # img2dataset keeps the .json of a failed download, without an image
        add_member(tf, "000000098.json", b'{"status": "failed_to_download"}')

    def link(tf):
        info = tarfile.TarInfo("000000097.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)

    write_shard(root / "00001.tar", NAMES[3:], 3, extra=[broken, failed_download, link])
    (root / "00000_stats.json").write_text("{}")
    return root


def test_webdataset_records_ids_captions_and_bytes(wds):
    ds = read_dataset(wds)
    assert ds.layout == "webdataset"
    assert [r.id for r in ds.records] == [f"0000{t}.tar/{i:09d}.jpg" for t, i in
                                          [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4)]]
    by_id = {r.id: r for r in ds.records}
    assert by_id["00000.tar/000000000.jpg"].caption == "a photo of astronaut"  # .txt wins
    assert by_id["00000.tar/000000001.jpg"].caption == "json coffee"           # else the json caption
    assert by_id["00001.tar/000000004.jpg"].identity == "id-camera"
    rec = by_id["00000.tar/000000002.jpg"]
    assert rec.sha256 == hashlib.sha256(jpeg("chelsea")).hexdigest()
    assert open_image(rec.path).size == (32, 32) == (rec.width, rec.height)
    skipped = {s.path: s.reason for s in ds.skipped}
    assert "decode" in skipped["00001.tar/000000099.jpg"]
    assert "not a regular file" in skipped["00001.tar/000000097.jpg"]


def test_webdataset_index_finds_exact_copies(wds, tmp_path):
    ds = read_dataset(wds / "00000.tar")  # a single shard works too
    assert [r.id for r in ds.records] == ["00000.tar/000000000.jpg", "00000.tar/000000001.jpg",
                                          "00000.tar/000000002.jpg"]
    emb = get_embedder({"name": "pixel", "resolution": 16})
    ref = ReferenceIndex.build(ds, [emb], tmp_path / "ref")
    q = emb.embed([open_image(r.path) for r in ds.records])
    _, ids = ref.search("pixel", q, 1)
    assert ref.record_rows("pixel", ids)[:, 0].tolist() == [0, 1, 2]


def test_webdataset_refuses_escaping_member_names(tmp_path):
    root = tmp_path / "evil"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tf:
        add_member(tf, "../../escape.jpg", jpeg("coffee"))
    with pytest.raises(DataError, match="escapes the archive"):
        read_dataset(root)


def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path):
    root = tmp_path / "cut"
    root.mkdir()
    write_shard(root / "00000.tar", NAMES, 0)
    data = (root / "00000.tar").read_bytes()
    (root / "00000.tar").write_bytes(data[: len(data) * 2 // 3])
    ds = read_dataset(root)
    assert 1 <= len(ds.records) < len(NAMES)
    assert any("damaged tar" in s.reason or "truncated" in s.reason or "decode" in s.reason for s in ds.skipped)


def test_malformed_json_sidecar_names_the_member(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tf:
        add_member(tf, "a.jpg", jpeg("coffee"))
        add_member(tf, "a.json", b"{not json")
    with pytest.raises(DataError, match="00000.tar/a.json is not valid JSON"):
        read_dataset(root)


# ------------------------------------------------------------------------------------------- parquet


def write_images(folder: Path, names=NAMES) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        real_image(name).resize((24, 24)).save(folder / f"{name}.png")
        out.append(folder / f"{name}.png")
    return out


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_list_of_paths(tmp_path):
    files = write_images(tmp_path / "data" / "img")
    (tmp_path / "data" / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = [{"file_name": f"img/{p.name}", "text": f"photo {p.stem}", "identity": None} for p in files[:3]]
    rows.append({"file_name": str(files[3].resolve()), "text": None, "identity": "x"})  # absolute, inside
    rows.append({"file_name": "img/broken.png", "text": None, "identity": None})
    ds = read_dataset(write_parquet(tmp_path / "data" / "train.parquet", rows))
    assert [r.id for r in ds.records] == ["img/astronaut.png", "img/coffee.png", "img/chelsea.png", "img/rocket.png"]
    assert ds.records[0].caption == "photo astronaut" and ds.records[3].identity == "x"
    assert ds.records[1].sha256 == hashlib.sha256(files[1].read_bytes()).hexdigest()
    assert [s.path for s in ds.skipped] == ["img/broken.png"]
    ref = ReferenceIndex.build(ds, [get_embedder({"name": "pixel", "resolution": 16})], tmp_path / "ref")
    assert ref.n_train == 4 and ref.manifest["dataset"]["layout"] == "parquet (train.parquet)"


@pytest.mark.parametrize("entry,words", [
    ("../outside.png", "escapes the dataset folder"),
    ("/etc/passwd", "outside the folder of the parquet file"),
])
def test_parquet_refuses_escapes(tmp_path, entry, words):
    write_images(tmp_path / "data", NAMES[:2])
    rows = [{"file_name": "astronaut.png"}, {"file_name": entry}]
    with pytest.raises(DataError, match=words):
        read_dataset(write_parquet(tmp_path / "data" / "list.parquet", rows))


def test_parquet_needs_a_path_column(tmp_path):
    write_images(tmp_path / "data", NAMES[:2])
    with pytest.raises(DataError, match="no 'file_name' or 'path' column"):
        read_dataset(write_parquet(tmp_path / "data" / "list.parquet", [{"url": "http://x"}]))


def test_parquet_path_column_and_duplicates(tmp_path):
    write_images(tmp_path / "data", NAMES[:2])
    ds = read_dataset(write_parquet(tmp_path / "data" / "a.parquet", [{"path": "coffee.png"}]))
    assert [r.id for r in ds.records] == ["coffee.png"]
    with pytest.raises(DataError, match="listed twice"):
        read_dataset(write_parquet(tmp_path / "data" / "b.parquet", [{"path": "coffee.png"}, {"path": "coffee.png"}]))


def test_not_a_parquet_file_is_a_clear_error(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_dataset(tmp_path / "x.parquet")
