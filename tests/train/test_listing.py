"""Checkpoint folders named step-N: which names count, their order, and resuming from the newest that loads."""

import pytest


@pytest.mark.parametrize(
    "name, step",
    [
        ("step-000012", 12),
        ("step-1000000", 1000000),
        ("step-0", 0),
        ("step-12.tmp", None),
        (".step-000003.tmp", None),
        ("step-", None),
        ("xstep-1", None),
        ("step-1x", None),
    ],
)
def test_step_of_takes_only_whole_step_names(name, step):
    from hybridlm.train.listing import step_of

    assert step_of(f"/runs/a/checkpoints/{name}") == step


def test_checkpoint_folder_names_are_padded_to_six_digits_and_read_back():
    from hybridlm.train.listing import checkpoint_dir_name, step_of

    assert [checkpoint_dir_name(s) for s in (7, 123456, 1234567)] == ["step-000007", "step-123456", "step-1234567"]
    assert all(step_of(checkpoint_dir_name(s)) == s for s in (0, 7, 999_999, 1_000_000))


def test_list_checkpoints_lists_step_folders_in_step_order(tmp_path):
    """Numeric order (text order puts step-1000000 before step-999999); files and other names are not listed."""
    from hybridlm.train.listing import list_checkpoints

    assert list_checkpoints(tmp_path / "missing") == []
    for name in ("step-1000000", "step-999999", "step-000010", ".step-000011.tmp", "latest"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-000020").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000010", "step-999999", "step-1000000"]


def test_load_newest_tries_newest_first_and_lists_every_failure(tmp_path, caplog):
    import logging

    from hybridlm import CheckpointError
    from hybridlm.train.listing import load_newest

    folders = [tmp_path / f"step-00000{i}" for i in (1, 2, 3)]
    tried = []

    def load(path):
        tried.append(path.name)
        if path.name != "step-000001":
            raise CheckpointError(f"{path.name[-1]} is damaged")
        return "loaded"

    with caplog.at_level(logging.WARNING, logger="hybridlm.checkpoint"):
        assert load_newest(folders, load) == ("loaded", folders[0])
    assert tried == ["step-000003", "step-000002", "step-000001"]
    assert "the newer checkpoint(s) could not be loaded" in caplog.text
    with pytest.raises(CheckpointError) as e:
        load_newest(folders[1:], load)
    assert str(e.value) == "no checkpoint could be loaded: step-000003: 3 is damaged; step-000002: 2 is damaged"
    with pytest.raises(CheckpointError, match=r"^no checkpoint to resume from$"):
        load_newest([], load)


def test_load_newest_stops_at_a_checkpoint_of_another_model(tmp_path):
    """An older checkpoint of the same run holds the same (other) model: none is tried after a mismatch."""
    from hybridlm.errors import CheckpointMismatchError
    from hybridlm.train.listing import load_newest

    tried = []

    def load(path):
        tried.append(path.name)
        raise CheckpointMismatchError(f"{path.name}: another model")

    with pytest.raises(CheckpointMismatchError, match=r"^step-2: another model$"):
        load_newest([tmp_path / "step-1", tmp_path / "step-2"], load)
    assert tried == ["step-2"]
