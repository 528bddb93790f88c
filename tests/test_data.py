"""The training-set reader on good, odd and hostile folders (issue 2 part 2, issue 7 parts 3-4)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers_core import scene
from memtrack.config import DataConfig
from memtrack.data.dataset import _bounded_lines, open_image, read_dataset, read_images
from memtrack.errors import DataError, MemtrackError

NAMES = ("astronaut", "coffee", "chelsea")


def _images(folder: Path, names=NAMES, size: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        scene(n, size).save(folder / f"{n}.png")
    return folder


def _jsonl(folder: Path, rows, name: str = "metadata.jsonl") -> Path:
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _read(folder, **cfg) -> "object":
    return read_dataset(folder, DataConfig(**cfg), show_progress=False)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` with almost no data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------- layouts


def test_imagefolder_with_jsonl_captions_and_identities(tmp_path):
    root = _images(tmp_path / "d")
    scene("rocket", 16).save(root / "unlisted.png")  # with metadata, only listed files are read
    _jsonl(root, [{"file_name": "astronaut.png", "text": "an astronaut", "identity": "eileen"},
                  {"file_name": "coffee.png", "text": "a cup", "identity": 7},
                  {"file_name": "chelsea.png"}])
    ds = _read(root)
    assert ds.layout == "imagefolder (metadata.jsonl)"
    assert [r.id for r in ds.records] == ["astronaut.png", "coffee.png", "chelsea.png"]
    assert [r.caption for r in ds.records] == ["an astronaut", "a cup", None]
    assert [r.identity for r in ds.records] == ["eileen", "7", None]
    assert (ds.records[0].width, ds.records[0].height) == (16, 16)
    for r in ds.records:
        assert r.sha256 == hashlib.sha256(Path(r.path).read_bytes()).hexdigest()
    assert ds.skipped == []


def test_imagefolder_with_csv_and_custom_columns(tmp_path):
    root = _images(tmp_path / "d")
    (root / "metadata.csv").write_text('file_name,prompt,person\nastronaut.png,"a, quoted caption",eileen\n'
                                       "coffee.png,,\n", encoding="utf-8")
    ds = _read(root, caption_column="prompt", identity_column="person")
    assert ds.layout == "imagefolder (metadata.csv)"
    assert [(r.id, r.caption, r.identity) for r in ds.records] == [
        ("astronaut.png", "a, quoted caption", "eileen"), ("coffee.png", None, None)]


def test_csv_written_by_excel_with_a_byte_order_mark(tmp_path):
    root = _images(tmp_path / "d")
    (root / "metadata.csv").write_text("\ufefffile_name,text\ncoffee.png,a cup\n", encoding="utf-8")
    ds = _read(root)
    assert [(r.id, r.caption) for r in ds.records] == [("coffee.png", "a cup")]


def test_plain_folder_is_read_recursively_with_stable_ids(tmp_path):
    root = _images(tmp_path / "d", names=("coffee",))
    _images(root / "sub" / "deeper", names=("astronaut",))
    _images(root / ".hidden", names=("rocket",))          # hidden folders are ignored
    scene("camera", 16).save(root / ".thumb.png")           # hidden files too
    (root / "notes.txt").write_text("not an image")         # other extensions are not images
    scene("chelsea", 16).save(root / "UPPER.JPG", format="JPEG")
    ds = _read(root)
    assert ds.layout == "folder"
    assert [r.id for r in ds.records] == ["UPPER.JPG", "coffee.png", "sub/deeper/astronaut.png"]
    again = _read(root)
    assert [(r.id, r.sha256) for r in again.records] == [(r.id, r.sha256) for r in ds.records]
    assert all(r.caption is None and r.identity is None for r in ds.records)


def test_sha256_is_of_the_file_bytes_not_the_pixels(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    scene("coffee", 16).save(root / "a.png")
    scene("coffee", 16).save(root / "b.png", compress_level=0)  # same pixels, different bytes
    a, b = _read(root).records
    assert a.sha256 != b.sha256
    assert np.array_equal(np.asarray(open_image(a.path)), np.asarray(open_image(b.path)))


# ------------------------------------------------------------------------------------- unreadable files


def test_corrupt_truncated_and_non_image_files_are_skipped_and_listed(tmp_path, caplog):
    root = _images(tmp_path / "d", names=("coffee",))
    good = (root / "coffee.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "garbage.png").write_bytes(os.urandom(500))
    (root / "text.jpg").write_text("hello, I am not a JPEG")
    (root / "empty.webp").write_bytes(b"")
    (root / "a_folder.png").mkdir()                           # a folder with an image's name
    os.symlink(root / "gone.png", root / "dangling.png")      # a dangling symlink
    os.symlink(root / "loop.png", root / "loop.png")          # a symlink loop
    with caplog.at_level("WARNING", logger="memtrack"):
        ds = _read(root)
    assert [r.id for r in ds.records] == ["coffee.png"]
    skipped = {s.path: s.reason for s in ds.skipped}
    assert set(skipped) == {"truncated.png", "garbage.png", "text.jpg", "empty.webp", "dangling.png", "loop.png"}
    assert all(reason for reason in skipped.values())
    assert "cannot decode" in skipped["truncated.png"]


def test_a_fifo_named_like_an_image_is_skipped_not_waited_on(tmp_path):
    root = _images(tmp_path / "d", names=("coffee",))
    os.mkfifo(root / "pipe.png")
    ds = _read(root)  # reading a FIFO would block forever
    assert [s.path for s in ds.skipped] == ["pipe.png"] and "not a regular file" in ds.skipped[0].reason
    good, bad = read_images(root)
    assert [p.name for p in good] == ["coffee.png"] and [b.path for b in bad] == ["pipe.png"]


def test_listed_but_missing_files_are_skipped(tmp_path):
    root = _images(tmp_path / "d", names=("coffee",))
    _jsonl(root, [{"file_name": "coffee.png"}, {"file_name": "missing.png"}])
    ds = _read(root)
    assert [r.id for r in ds.records] == ["coffee.png"]
    assert ds.skipped[0].path == "missing.png" and "cannot read" in ds.skipped[0].reason


def test_nothing_readable_is_a_clear_error(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="none of the 1 images") as err:
        _read(root)
    assert "bad.png" in err.value.hint


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        _read(tmp_path / "empty")
    with pytest.raises(DataError, match="training set folder not found"):
        _read(tmp_path / "nope")
    _jsonl(tmp_path / "empty", [])
    with pytest.raises(DataError, match="no images found"):
        _read(tmp_path / "empty")


@pytest.mark.parametrize("width,height,words", [
    (100_000, 100_000, "decompression bomb"),      # beyond PIL's own hard limit: refused by PIL at open
    (10_000, 10_000, "over the limit"),            # 100M pixels > memtrack's 64M default
])
def test_decompression_bombs_are_refused_by_header(tmp_path, width, height, words):
    root = _images(tmp_path / "d", names=("coffee",))
    (root / "bomb.png").write_bytes(_png_header(width, height))
    ds = _read(root)
    assert [r.id for r in ds.records] == ["coffee.png"]
    (skip,) = ds.skipped
    assert skip.path == "bomb.png" and words in skip.reason
    with pytest.raises(DataError, match=words) as err:
        open_image(root / "bomb.png")
    assert "bomb.png" in err.value.message


def test_pixel_limit_is_configurable(tmp_path):
    root = _images(tmp_path / "d", names=("coffee", "rocket"), size=16)
    scene("camera", 32).save(root / "big.png")
    ds = _read(root, max_image_pixels=16 * 16)
    assert [s.path for s in ds.skipped] == ["big.png"]
    assert "1,024 pixels, over the limit of 256" in ds.skipped[0].reason


# --------------------------------------------------------------------------------------- image modes


def _open_saved(tmp_path, image: Image.Image, name: str, **save) -> Image.Image:
    path = tmp_path / name
    image.save(path, **save)
    out = open_image(path)
    assert out.mode == "RGB"
    return out


def test_grayscale_palette_and_cmyk_become_rgb(tmp_path):
    rgb = scene("coffee", 16)
    gray = _open_saved(tmp_path, rgb.convert("L"), "g.png")
    a = np.asarray(gray)
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], np.asarray(rgb.convert("L")))
    pal = _open_saved(tmp_path, rgb.convert("P"), "p.png")
    assert np.array_equal(np.asarray(pal), np.asarray(rgb.convert("P").convert("RGB")))
    cmyk = _open_saved(tmp_path, Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "c.jpg", quality=100)
    assert np.abs(np.asarray(cmyk, int) - [255, 0, 0]).max() <= 3   # pure red survives the conversion


def test_rgba_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))           # fully transparent black -> white
    im.putpixel((1, 0), (0, 0, 0, 128))         # half-transparent black -> mid grey
    out = np.asarray(_open_saved(tmp_path, im, "a.png"), int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert np.abs(out[0, 1] - 127).max() <= 1
    assert out[3, 3].tolist() == [255, 0, 0]


def test_16_bit_grayscale_maps_full_range_to_8_bit(tmp_path):
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    out = np.asarray(_open_saved(tmp_path, Image.fromarray(ramp), "deep.png"), int)
    assert out[0, 0].tolist() == [0, 0, 0] and out[-1, -1].tolist() == [255, 255, 255]
    assert np.abs(out[..., 0] - ramp / 257.0).max() <= 1.0


def test_a_dark_16_bit_image_stays_dark(tmp_path):
    dark = np.full((8, 8), 5140, np.uint16)  # 5140 / 65535 = 20 / 255
    dark[0, 0] = 10280
    out = np.asarray(_open_saved(tmp_path, Image.fromarray(dark), "dark.png"), int)
    assert out[1, 1].tolist() == [20, 20, 20] and out[0, 0].tolist() == [40, 40, 40]


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (20, 10), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 6, 5))     # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6                            # "rotate 90 CW to display"
    out = _open_saved(tmp_path, stored, "rot.jpg", exif=exif, quality=95)
    assert out.size == (10, 20)
    a = np.asarray(out, int)
    assert a[0, -1, 0] > 200 and a[0, -1, 2] < 60   # red is now top-right
    assert a[0, 0, 2] > 200 and a[0, 0, 0] < 60     # blue top-left


# ------------------------------------------------------------------------------- hostile metadata


@pytest.mark.parametrize("file_name,words", [
    ("../x.png", "escapes the dataset folder"),
    ("sub/../../x.png", "escapes the dataset folder"),
    ("/etc/passwd", "escapes the dataset folder"),
    ("\\\\server\\share.png", "escapes the dataset folder"),
    ("", "must be a non-empty string"),
    (3, "must be a non-empty string"),
    (["a.png"], "must be a non-empty string"),
    ("a\x00.png", "NUL byte"),
])
def test_file_names_that_escape_or_are_not_paths_are_refused(tmp_path, file_name, words):
    root = _images(tmp_path / "d", names=("coffee",))
    _jsonl(root, [{"file_name": "coffee.png"}, {"file_name": file_name}])
    with pytest.raises(DataError) as err:
        _read(root)
    assert "metadata.jsonl line 2" in err.value.message and words in err.value.message


def test_symlinks_out_of_the_folder_are_refused_unless_allowed(tmp_path):
    outside = _images(tmp_path / "outside", names=("rocket",))
    root = _images(tmp_path / "d", names=("coffee",))
    os.symlink(outside / "rocket.png", root / "link.png")
    os.symlink(outside, root / "linkdir")
    # metadata naming the link, or a path through a linked folder
    for entry in ("link.png", "linkdir/rocket.png"):
        _jsonl(root, [{"file_name": entry}])
        with pytest.raises(DataError, match="resolves outside the dataset folder") as err:
            _read(root)
        assert entry in err.value.message and "line 1" in err.value.message
    assert [r.id for r in _read(root, follow_symlinks_outside=True).records] == ["linkdir/rocket.png"]
    # plain folder: the file symlink is refused by name (the folder symlink is not walked)
    (root / "metadata.jsonl").unlink()
    with pytest.raises(DataError, match="link.png is a symlink that resolves outside"):
        _read(root)
    assert [r.id for r in _read(root, follow_symlinks_outside=True).records] == ["coffee.png", "link.png"]


def test_symlinks_inside_the_folder_are_fine(tmp_path):
    root = _images(tmp_path / "d", names=("coffee",))
    os.symlink(root / "coffee.png", root / "alias.png")
    ds = _read(root)
    assert [r.id for r in ds.records] == ["alias.png", "coffee.png"]
    assert ds.records[0].sha256 == ds.records[1].sha256


def test_huge_metadata_lines_are_refused_naming_the_line(tmp_path):
    root = _images(tmp_path / "d", names=("coffee",))
    _jsonl(root, [{"file_name": "coffee.png"}, {"file_name": "coffee.png", "text": "x" * 5000}])
    with pytest.raises(DataError, match="metadata.jsonl line 2 is over the limit of 1,000 bytes"):
        _read(root, max_metadata_line_bytes=1000)
    (root / "metadata.jsonl").unlink()
    (root / "metadata.csv").write_text("file_name,text\ncoffee.png," + "y" * 5000 + "\n")
    with pytest.raises(DataError, match="metadata.csv"):
        _read(root, max_metadata_line_bytes=1000)


def test_a_line_without_end_is_not_read_whole():
    class Endless:  # a metadata "line" that never ends (think /dev/zero): only limit + 1 bytes are read
        read = 0

        def readline(self, size=-1):
            assert size > 0, "an unbounded readline would never return"
            Endless.read += size
            return b"a" * size

    with pytest.raises(DataError, match="line 1 is over the limit"):
        list(_bounded_lines(Endless(), 1000, "metadata.jsonl"))
    assert Endless.read == 1001


@pytest.mark.parametrize("row,words", [
    ({"file_name": "coffee.png", "text": ["a", "list"]}, "column 'text' must be a string, got list"),
    ({"file_name": "coffee.png", "identity": {"id": 1}}, "column 'identity' must be a string, got dict"),
    ({"file_name": "coffee.png", "text": True}, "column 'text' must be a string, got bool"),
    ({"text": "no file"}, "missing the 'file_name' field"),
    ('["coffee.png"]', "expected a JSON object, got list"),
    ('{"file_name": "coffee.png"', "is not valid JSON"),
    ('{"file_name": 1' + "1" * 5000 + "}", "is not valid JSON"),     # int beyond Python's digit limit
    ("[" * 100_000, "is not valid JSON"),                             # nesting beyond the recursion limit
    ("\udcff", "is not valid JSON"),                                  # not UTF-8
])
def test_wrong_types_in_metadata_name_file_and_line(tmp_path, row, words):
    root = _images(tmp_path / "d", names=("coffee", "rocket"))
    path = root / "metadata.jsonl"
    line = row if isinstance(row, str) else json.dumps(row)
    path.write_bytes(b'{"file_name": "rocket.png"}\n' + line.encode("utf-8", "surrogateescape") + b"\n")
    with pytest.raises(DataError) as err:
        _read(root)
    assert "metadata.jsonl line 2" in err.value.message and words in err.value.message


@pytest.mark.parametrize("text,words", [
    ("name,text\ncoffee.png,x\n", "has no 'file_name' column"),
    ("file_name,text\ncoffee.png,x,extra\n", "line 2 has more fields than the header"),
    ("file_name\n\x00coffee.png\n", "line 2: 'file_name' contains a NUL byte"),
    # a quoted field spanning many short lines: each line is under the limit, the field is not
    ('file_name,text\ncoffee.png,"' + ("z" * 50 + "\n") * 10 + '"\n', "not valid CSV"),
])
def test_bad_csv_metadata(tmp_path, text, words):
    root = _images(tmp_path / "d", names=("coffee",))
    (root / "metadata.csv").write_text(text)
    with pytest.raises(DataError, match=words):
        _read(root, max_metadata_line_bytes=200)


def test_non_utf8_csv(tmp_path):
    root = _images(tmp_path / "d", names=("coffee",))
    (root / "metadata.csv").write_bytes(b"file_name,text\ncoffee.png,caf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        _read(root)


@pytest.mark.parametrize("second", ["coffee.png", "./coffee.png", "sub/../coffee.png"])
def test_duplicate_entries_are_refused(tmp_path, second):
    root = _images(tmp_path / "d", names=("coffee",))
    (root / "sub").mkdir()
    _jsonl(root, [{"file_name": "coffee.png"}, {"file_name": second}])
    if ".." in second:  # refused before it can be compared: '..' is never allowed
        with pytest.raises(DataError, match="line 2: file_name 'sub/../coffee.png' escapes"):
            _read(root)
        return
    with pytest.raises(DataError, match=r"metadata.jsonl line 2: file_name .* is listed twice"):
        _read(root)


def test_read_images_lists_the_unreadable(tmp_path):
    root = _images(tmp_path / "gen", names=("coffee", "rocket"))
    (root / "bad.png").write_bytes(b"\x89PNG broken")
    good, bad = read_images(root)
    assert [p.name for p in good] == ["coffee.png", "rocket.png"]
    assert [b.path for b in bad] == ["bad.png"]
    with pytest.raises(DataError, match="image folder not found"):
        read_images(tmp_path / "nope")


def test_open_image_from_bytes_and_errors():
    buf = io.BytesIO()
    scene("coffee", 8).save(buf, format="PNG")
    assert open_image(buf.getvalue()).size == (8, 8)
    with pytest.raises(DataError, match="cannot decode image <bytes>"):
        open_image(b"nope")
    with pytest.raises(DataError, match="cannot open image"):
        open_image("/nonexistent/x.png")


# ------------------------------------------------------------------------------------------- fuzzing

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                     max_leaves=8)
_ROW = st.dictionaries(st.sampled_from(["file_name", "text", "identity", "other"]),
                       _JSON | st.sampled_from(["coffee.png", "rocket.png", "../x.png", "/abs.png", "sub/a.png",
                                                "missing.png", "coffee.png\x00"]), max_size=4)
_LINE = st.one_of(_ROW.map(lambda r: json.dumps(r).encode()),
                  _JSON.map(lambda v: json.dumps(v).encode()),
                  st.binary(max_size=60),
                  st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")))


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "d"
    _images(root, names=("coffee", "rocket"), size=8)
    return root


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=6), as_csv=st.booleans())
def test_fuzz_metadata_reader_raises_only_data_errors(fuzz_root, lines, as_csv):
    for name in ("metadata.jsonl", "metadata.csv"):
        (fuzz_root / name).unlink(missing_ok=True)
    target = fuzz_root / ("metadata.csv" if as_csv else "metadata.jsonl")
    body = b"\n".join(lines) + b"\n"
    target.write_bytes((b"file_name,text,identity\n" + body) if as_csv else body)
    try:
        ds = read_dataset(fuzz_root, DataConfig(max_metadata_line_bytes=4096), show_progress=False)
    except MemtrackError as exc:
        assert isinstance(exc, DataError) and exc.message
        return
    assert all(Path(r.path).resolve().is_relative_to(fuzz_root.resolve()) for r in ds.records)
    assert {r.id for r in ds.records} <= {"coffee.png", "rocket.png"}
