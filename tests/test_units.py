"""units.row_chunks and units.few; pipeline.checkpoint_by_default."""

import pytest

from infdit_cli.jobs.pipeline import CHECKPOINT_AFTER, checkpoint_by_default
from infdit_cli.units import few, row_chunks


@pytest.mark.parametrize("height,row,budget,step", [(10, 100, 300, 3), (10, 100, 50, 1), (5, 0, 10, 5),
                                                      (4, 10, 1000, 4)])
def test_row_chunks_cover_every_row_once_within_the_budget(height, row, budget, step):
    chunks = row_chunks(height, row, budget)
    assert [i for s in chunks for i in range(s.start, s.stop)] == list(range(height))
    sizes = [s.stop - s.start for s in chunks]
    assert all(n <= step for n in sizes) and sizes[0] == min(step, height)


def test_few_names_three_and_counts_the_rest():
    assert few(["a", "b"]) == "a, b"
    assert few(list("abcdef")) == "a, b, c and 3 more"


def test_checkpoint_by_default(tmp_path):
    assert not checkpoint_by_default(tmp_path / "run", CHECKPOINT_AFTER)
    assert checkpoint_by_default(tmp_path / "run", CHECKPOINT_AFTER + 1)
    (tmp_path / "run").symlink_to(tmp_path / "nowhere")  # a dangling link counts: the folder is taken
    assert checkpoint_by_default(tmp_path / "run", 0.0)
