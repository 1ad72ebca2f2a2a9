"""``share-unlearnable``: a client writes a protected copy of its data to hand over, once,
and trains on its own data unchanged."""

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fedface.config import RunConfig
from fedface.config.unlearnable import SHARE_CHOICES
from fedface.data.prepare import ClientData
from fedface.data.synthetic import SyntheticConfig, generate
from fedface.errors import UserError
from fedface.unlearnable.noise import MODES
from fedface.unlearnable.share import _share, share_dir, share_protected_copy


def test_the_choices_are_the_noise_modes():
    assert SHARE_CHOICES == ("off", *MODES)
    with pytest.raises(ValueError, match="share_unlearnable='pixel'"):
        RunConfig(share_unlearnable="pixel")


def test_a_client_shares_a_protected_copy_and_trains_on_its_own_data(tmp_path):
    from client.task import load_client_data
    from fedface.protocol import NODE_PARTITION_ID

    x, y = generate(SyntheticConfig(num_identities=4, images_per_identity=6, size=32))
    y = np.unique(y, return_inverse=True)[1]
    ClientData(x[:20], y[:20], x[20:], y[20:]).save(tmp_path / "client_003.npz")
    context = SimpleNamespace(node_config={NODE_PARTITION_ID: 3}, run_config={})
    cfg = RunConfig(image_size=32, share_unlearnable="sample")
    plain = load_client_data(context, str(tmp_path), RunConfig(image_size=32))
    shared = load_client_data(context, str(tmp_path), cfg)
    assert np.array_equal(shared.x_train, plain.x_train)  # what it trains on is unchanged
    assert np.array_equal(shared.x_train, x[:20])
    out = share_dir(tmp_path / "client_003.npz", "sample")
    files = sorted(out.rglob("*.png"), key=lambda f: int(f.stem))
    assert len(files) == 20 and (out / "unlearnable.json").exists()
    assert [int(f.parent.name) for f in files] == list(y[:20])  # one folder per identity
    copy = np.stack([np.asarray(Image.open(f)) for f in files])
    moved = np.abs(copy.astype(int) - x[:20])
    assert 1 <= moved.max() <= 8 and moved.mean() > 1
    assert not list(tmp_path.glob("*.state.pt")) and not list(out.rglob("*.pt"))
    stamp = (out / "unlearnable.json").stat().st_mtime_ns
    _share.cache_clear()  # a new process: the manifest on disk says the copy is made
    load_client_data(context, str(tmp_path), cfg)
    assert (out / "unlearnable.json").stat().st_mtime_ns == stamp  # made once
    _share.cache_clear()
    load_client_data(context, str(tmp_path), cfg.replace(seed=1))  # other settings: remade
    assert (out / "unlearnable.json").stat().st_mtime_ns != stamp
    assert len(list(out.rglob("*.png"))) == 20 and not list(tmp_path.glob(".*writing"))


def test_a_folder_in_the_way_is_never_overwritten(tmp_path):
    x, y = generate(SyntheticConfig(num_identities=2, images_per_identity=4, size=32))
    path = tmp_path / "client.npz"
    ClientData(x, np.unique(y, return_inverse=True)[1], x[:2], y[:2] * 0).save(path)
    mine = share_dir(path, "class")
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no unlearnable manifest"):
        share_protected_copy(path, RunConfig(image_size=32, share_unlearnable="class"))
    assert (mine / "notes.txt").read_text() == "mine"
