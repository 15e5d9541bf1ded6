"""INPUT arguments: files, folders, globs, and arguments that name nothing."""

from __future__ import annotations

from softcli.io.inputs import expand_inputs


def test_files_folders_globs_and_failures(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    sub = tmp_path / "dir" / "deeper"
    sub.mkdir(parents=True)
    (tmp_path / "dir" / "b.png").write_bytes(b"x")
    (sub / "c.TIF").write_bytes(b"x")
    (sub / "notes.txt").write_text("not an image")
    (sub / ".hidden.png").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    items = expand_inputs([tmp_path / "a.jpg", tmp_path / "dir", str(tmp_path / "*.jpg"), tmp_path / "nope.png",
                           str(tmp_path / "*.gif"), tmp_path / "empty", sub / "notes.txt"])
    got = [(i.path, i.error) for i in items]
    assert got[:3] == [(str(tmp_path / "a.jpg"), None), (str(tmp_path / "dir" / "b.png"), None),
                       (str(sub / "c.TIF"), None)]  # the glob's a.jpg is not repeated
    assert got[3] == (str(tmp_path / "nope.png"), "no such file")
    assert got[4] == (str(tmp_path / "*.gif"), "no file matches this pattern")
    assert got[5][0] == str(tmp_path / "empty") and got[5][1].startswith("folder holds no images")
    assert got[6] == (str(sub / "notes.txt"), None)  # named explicitly: tried, whatever its suffix
    assert len(got) == 7
