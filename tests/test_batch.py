"""batch.py: output names decided up front, collisions never silent, total isolation of one file's failure."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infdit_cli.errors import BadImage, BadRequest
from infdit_cli.events import Notice
from infdit_cli.jobs.batch import find_images, plan_batch, preview_batch, run_batch


def img(path: Path, size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 100, np.uint8)).save(path)
    return path


def names(items, root):
    return {Path(i.input).name: (Path(i.output).relative_to(root).as_posix(), i.status) for i in items}


def test_collision_keeps_the_source_extension(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    img(root / "photo.png"), img(root / "photo.gif"), img(root / "scan.bmp")
    items = plan_batch(root, out)
    assert names(items, out) == {"photo.png": ("photo.png", "todo"), "photo.gif": ("photo.gif.png", "todo"),
                                 "scan.bmp": ("scan.png", "todo")}


def test_collision_that_remains_is_refused_for_both(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    img(root / "photo.png"), img(root / "photo.gif"), img(root / "photo.gif.png")
    items = {Path(i.input).name: i for i in plan_batch(root, out)}
    assert items["photo.png"].status == "todo"
    for name in ("photo.gif", "photo.gif.png"):
        assert items[name].status == "failed" and "would also be written" in items[name].reason


def test_output_inside_input_is_never_read_back(tmp_path, monkeypatch):
    root = tmp_path / "in"
    img(root / "a.png"), img(root / "out" / "a.png"), img(root / "sub" / "b.png")
    found = find_images(root, recursive=True, exclude=root / "out")
    assert [p.relative_to(root).as_posix() for p in found] == ["a.png", "sub/b.png"]
    monkeypatch.chdir(tmp_path)  # a relative input and an absolute output naming a folder inside it
    items = plan_batch(Path("in"), (root / "out").resolve(), recursive=True)
    assert sorted(Path(i.input).as_posix() for i in items) == ["in/a.png", "in/sub/b.png"]


def test_same_folder_and_missing_folder_refused(tmp_path):
    img(tmp_path / "a.png")
    with pytest.raises(BadRequest, match="output folder is the input folder"):
        plan_batch(tmp_path, tmp_path / ".")
    with pytest.raises(BadImage, match="no such folder"):
        plan_batch(tmp_path / "nope", tmp_path / "out")


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    img(root / "a.png"), img(out / "a.png")
    assert plan_batch(root, out)[0].status == "skipped"
    assert plan_batch(root, out, overwrite=True)[0].status == "todo"


def test_preview_gives_sizes_and_failures(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    img(root / "a.png", (10, 4))
    (root / "b.jpg").write_text("not a picture")
    items = {Path(i.input).name: i for i in preview_batch(plan_batch(root, out), res=None, scale=3,
                                                          max_pixels=None)}
    assert items["a.png"].reason == "10x4 -> 30x12"
    assert items["b.jpg"].status == "failed" and "not an image" in items["b.jpg"].reason
    assert not out.exists()  # a dry run creates nothing


class FlakyUpscaler:
    """Raises what it is told for some files, writes a marker for the others."""

    def __init__(self, failures):
        self.failures = failures

    def upscale_file(self, src, dst, **kw):
        exc = self.failures.get(Path(src).name)
        kw["on_event"](Notice(f"{src}: a notice"))
        if exc is not None:
            raise exc
        Path(dst).write_bytes(b"ok")
        return type("R", (), {"seconds": 0.5})()


def test_any_exception_from_one_file_is_recorded_and_the_rest_go_on(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    for n in "abcde":
        img(root / f"{n}.png")
    up = FlakyUpscaler({"a.png": ZeroDivisionError("division by zero"), "c.png": KeyError("x"),
                        "d.png": MemoryError()})
    report = run_batch(up, root, out, res=None, scale=2, recursive=False, glob=None, overwrite=False,
                       quality=95, max_pixels=None)
    status = {Path(i.input).name: (i.status, i.reason) for i in report.items}
    assert status == {"a.png": ("failed", "ZeroDivisionError: division by zero"), "b.png": ("done", ""),
                      "c.png": ("failed", "KeyError: 'x'"), "d.png": ("failed", "MemoryError"),
                      "e.png": ("done", "")}
    assert all(i.warnings == [f"{i.input}: a notice"] for i in report.items)


def test_ctrl_c_stops_the_batch(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    img(root / "a.png"), img(root / "b.png")
    with pytest.raises(KeyboardInterrupt):
        run_batch(FlakyUpscaler({"a.png": KeyboardInterrupt()}), root, out, res=None, scale=2,
                  recursive=False, glob=None, overwrite=False, quality=95, max_pixels=None)
    assert not (out / "b.png").exists()


def test_batch_lines_name_each_file_and_the_plan_comes_first(tmp_path, monkeypatch, capsys, tiny_weights):
    """The batch's plan in one line first, then each file's predicted time naming the file (its path in the
    folder: two subfolders may hold one name)."""
    from test_download import run_main

    root = tmp_path / "in"
    img(root / "a.png", (12, 10)), img(root / "sub" / "a.png", (12, 10))
    monkeypatch.setenv("INFDIT_CACHE", str(tmp_path / "cache"))
    code, lines = run_main(monkeypatch, capsys, "batch", root, "-o", tmp_path / "out", "--recursive",
                           "--scale", "2", "--steps", "2", "--device", "cpu", "--weights", tiny_weights)
    assert code == 0, lines
    assert lines[0].startswith("2 file(s) to upscale: predicted ") and \
        "on cpu (2 pass(es), 6 model calls)" in lines[0]
    predicted = [ln for ln in lines if "predicted" in ln]
    assert [ln.split(": predicted ")[0] for ln in predicted] == ["2 file(s) to upscale", "a.png",
                                                                 "sub/a.png"], lines


def test_table_title_shortens_paths_instead_of_wrapping(tmp_path, monkeypatch, capsys):
    """At 120 columns a title with long paths is one line: the folders' last names kept whole, "..." for the
    rest; short paths are left alone, relative to the current folder."""
    from test_download import run_main

    from infdit_cli.cli.batch import shorten_path, table_title

    assert shorten_path("/a/bb/ccc", 20) == "/a/bb/ccc"
    assert shorten_path("/data/photos/holiday_2026", 20) == ".../holiday_2026"
    assert shorten_path("/x/" + "n" * 30, 12) == "..." + "n" * 9
    monkeypatch.chdir(tmp_path)
    assert table_title(tmp_path / "in", tmp_path / "out", True, 120) == "in -> out (dry run)"

    deep = tmp_path.joinpath(*[f"a_folder_with_a_rather_long_name_{i}" for i in range(3)])
    root, out = deep / "photos_of_the_summer", deep / "photos_of_the_summer_upscaled_to_four_k"
    img(root / "a.png")
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.chdir("/")
    code, lines = run_main(monkeypatch, capsys, "batch", root, "-o", out, "--scale", "2", "--dry-run")
    assert code == 0, lines
    title, border = lines[0], lines[1]
    assert len(title) <= 120 and title.endswith("/photos_of_the_summer_upscaled_to_four_k (dry run)"), lines
    assert title.startswith(".../") and "/photos_of_the_summer -> .../" in title
    assert border.startswith("┏") and all(len(ln) <= 120 for ln in lines)
