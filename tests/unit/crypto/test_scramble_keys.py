"""crypto/scramble.py: key files (creation, permissions, refusals) and keyed streams."""

import os
import stat

import numpy as np
import pytest

from crypto.scramble import (
    KEY_HEADER,
    ScrambleKeyError,
    key_id,
    keystream,
    load_key,
    new_key,
    new_nonce,
    permutation,
    tag,
)


def test_new_key_is_owner_only_and_loads_back(tmp_path):
    path = tmp_path / "keys" / "scramble.key"
    key = new_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().splitlines() == [KEY_HEADER, key.hex()]
    assert load_key(path) == key
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporary left
    assert new_key(tmp_path / "other.key") != key


def test_new_key_refuses_to_overwrite(tmp_path):
    path = tmp_path / "scramble.key"
    key = new_key(path)
    with pytest.raises(ScrambleKeyError, match="already exists.*refusing to overwrite"):
        new_key(path)
    assert load_key(path) == key
    link = tmp_path / "dangling.key"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ScrambleKeyError, match="already exists"):
        new_key(link)
    assert not (tmp_path / "nowhere").exists()


def test_missing_key_file_names_the_path(tmp_path):
    path = tmp_path / "absent.key"
    with pytest.raises(ScrambleKeyError, match=f"{path} does not exist.*key file the images were"):
        load_key(path)


@pytest.mark.parametrize("content, match", [
    (b"", "not a fedface scramble key"),
    (b"\x00\xff" * 16, "not a fedface scramble key"),
    (b"some other file\n", "not a fedface scramble key"),
    (f"{KEY_HEADER}\n".encode(), "does not hold 32 bytes"),
    (f"{KEY_HEADER}\n{'ab' * 31}\n".encode(), "does not hold 32 bytes"),
    (f"{KEY_HEADER}\n{'zz' * 32}\n".encode(), "does not hold 32 bytes"),
    (f"{KEY_HEADER}\n{'ab' * 32}\nextra\n".encode(), "does not hold 32 bytes"),
    (b"x" * 10_000, "not a fedface scramble key"),
])
def test_garbled_key_file_is_refused_naming_the_path(tmp_path, content, match):
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ScrambleKeyError, match=match) as err:
        load_key(path)
    assert str(path) in str(err.value)


def test_key_file_with_windows_line_ends_loads(tmp_path):
    path = tmp_path / "crlf.key"
    path.write_bytes(f"{KEY_HEADER}\r\n{'ab' * 32}\r\n".encode())
    path.chmod(0o600)
    assert load_key(path) == bytes.fromhex("ab" * 32)


def test_insecure_key_files_are_refused(tmp_path):
    path = tmp_path / "scramble.key"
    new_key(path)
    path.chmod(0o644)
    with pytest.raises(ScrambleKeyError, match=f"scramble key {path} is readable by other users.*chmod 600"):
        load_key(path)
    path.chmod(0o600)
    link = tmp_path / "link.key"
    link.symlink_to(path)
    with pytest.raises(ScrambleKeyError, match="symbolic link"):
        load_key(link)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ScrambleKeyError, match="not a regular file"):
        load_key(fifo)


def test_key_id_is_short_stable_and_not_the_key():
    key = bytes(range(32))
    kid = key_id(key)
    assert kid == key_id(key) and len(kid) == 16
    assert kid not in key.hex()
    assert key_id(bytes(32)) != kid
    with pytest.raises(ScrambleKeyError, match="32 bytes"):
        key_id(b"short")


def test_permutation_is_a_keyed_permutation():
    key, nonce = bytes(range(32)), new_nonce()
    p = permutation(key, nonce, 0, (0, 0, 30, 40), 1200)
    assert p.dtype == np.int64 and sorted(p.tolist()) == list(range(1200))
    assert np.array_equal(p, permutation(key, nonce, 0, (0, 0, 30, 40), 1200))
    # every input changes it: key, nonce, face index, geometry
    for other in (permutation(bytes(32), nonce, 0, (0, 0, 30, 40), 1200),
                  permutation(key, new_nonce(), 0, (0, 0, 30, 40), 1200),
                  permutation(key, nonce, 1, (0, 0, 30, 40), 1200),
                  permutation(key, nonce, 0, (1, 0, 31, 40), 1200)):
        assert (other != p).mean() > 0.9
    assert (p != np.arange(1200)).mean() > 0.9
    assert permutation(key, nonce, 0, (0, 0, 0, 0), 0).shape == (0,)


def test_keystream_is_keyed_and_uniform():
    key, nonce = bytes(range(32)), new_nonce()
    ks = keystream(key, nonce, 0, (0, 0, 100, 100), 30_000)
    assert ks.dtype == np.uint8 and ks.shape == (30_000,)
    assert np.array_equal(ks, keystream(key, nonce, 0, (0, 0, 100, 100), 30_000))
    counts = np.bincount(ks, minlength=256)
    assert counts.min() > 60 and counts.max() < 180  # ~117 expected per value
    assert (keystream(bytes(32), nonce, 0, (0, 0, 100, 100), 30_000) != ks).mean() > 0.95
    assert (keystream(key, nonce, 1, (0, 0, 100, 100), 30_000) != ks).mean() > 0.95
    with pytest.raises(ValueError, match="nonce"):
        keystream(key, b"short", 0, (0, 0, 1, 1), 3)


def test_tag_binds_key_nonce_and_parts():
    key, nonce = bytes(range(32)), new_nonce()
    t = tag(key, nonce, b"ab", b"c")
    assert t == tag(key, nonce, b"ab", b"c") and len(t) == 32
    assert t != tag(key, nonce, b"a", b"bc")
    assert t != tag(bytes(32), nonce, b"ab", b"c")
    assert t != tag(key, new_nonce(), b"ab", b"c")
