import os

from pertoken.atomic import atomic_path, write_text_atomic


def test_an_owner_only_temporary_file_lands_with_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "out.bin") as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors does
            os.write(fd, b"x")
            os.close(fd)
        assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644
        assert write_text_atomic(tmp_path / "t.txt", "hi").read_text() == "hi"
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    finally:
        os.umask(umask)


def test_a_new_folder_lands_traversable(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "folder") as tmp:
            tmp.mkdir()
            (tmp / "inside.txt").write_text("hi")
        assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "folder" / "inside.txt").read_text() == "hi"
    finally:
        os.umask(umask)
