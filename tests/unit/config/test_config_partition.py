import numpy as np
import pytest

from fedface.config import RunConfig
from fedface.data.partition import partition_identities, verification_pairs


def test_run_config_round_trip_and_coercion():
    cfg = RunConfig(num_clients=4, rounds=3, lr=0.05)
    back = RunConfig.from_run_config(cfg.to_run_config())
    assert back == cfg
    # flwr run -c gives strings; kebab-case keys
    c2 = RunConfig.from_run_config({"num-clients": "6", "flip-tta": "true", "lr": "0.2"})
    assert (c2.num_clients, c2.flip_tta, c2.lr) == (6, True, 0.2)


def test_run_config_rejects_unknown_and_invalid():
    with pytest.raises(ValueError, match="Unknown run-config keys.*'rundz'.*Valid keys"):
        RunConfig.from_run_config({"rundz": 3})
    with pytest.raises(ValueError, match="mode='fed'"):
        RunConfig(mode="fed")
    with pytest.raises(ValueError, match="num-clients='x' is not a valid int"):
        RunConfig.from_run_config({"num-clients": "x"})
    with pytest.raises(ValueError, match="min_train_nodes=5 > num_clients=3"):
        RunConfig(num_clients=3, min_train_nodes=5)


def test_data_key_changes_with_data_settings_only():
    a = RunConfig()
    assert a.data_key() == RunConfig(rounds=9, lr=0.3).data_key()
    assert a.data_key() != RunConfig(num_clients=4).data_key()
    assert a.data_key() != RunConfig(image_size=96).data_key()


@pytest.mark.parametrize(("scheme", "alpha"), [("dirichlet", 0.5), ("powerlaw", 1.5)])
def test_identity_disjoint_partition(scheme, alpha):
    labels = np.repeat(np.arange(200), 5)
    splits = partition_identities(labels, 8, scheme=scheme, alpha=alpha, val_fraction=0.2, seed=3)
    seen = set()
    all_idx = []
    for s in splits:
        ids = set(labels[s.train]) | set(labels[s.val])
        assert not ids & seen, "an identity lives at two clients"
        seen |= ids
        assert not set(labels[s.train]) & set(labels[s.val]), "validation ids must be held out"
        all_idx += list(s.train) + list(s.val)
    assert sorted(all_idx) == list(range(len(labels)))  # nothing lost, nothing duplicated
    sizes = sorted(len(s.train) + len(s.val) for s in splits)
    assert sizes[-1] >= 3 * sizes[0], f"sizes not skewed: {sizes}"
    assert min(len({*labels[s.train], *labels[s.val]}) for s in splits) >= 2
    # deterministic
    again = partition_identities(labels, 8, scheme=scheme, alpha=alpha, val_fraction=0.2, seed=3)
    assert all(np.array_equal(x.train, y.train) for x, y in zip(splits, again))
    other = partition_identities(labels, 8, scheme=scheme, alpha=alpha, val_fraction=0.2, seed=4)
    assert any(not np.array_equal(x.train, y.train) for x, y in zip(splits, other))


def test_iid_partition_balanced_and_shares_identities():
    labels = np.repeat(np.arange(50), 8)
    splits = partition_identities(labels, 4, scheme="iid", val_fraction=0.0)
    sizes = [len(s.train) for s in splits]
    assert max(sizes) - min(sizes) <= 1
    assert len(set(labels[splits[0].train]) & set(labels[splits[1].train])) > 10


def test_partition_refuses_too_few_identities():
    with pytest.raises(ValueError, match="5 identities cannot give 4 clients"):
        partition_identities(np.repeat(np.arange(5), 3), 4)


def test_verification_pairs_balanced():
    labels = np.repeat(np.arange(10), 4)
    a, b, same = verification_pairs(labels, max_pairs=40, seed=0)
    assert same.sum() == (~same).sum() == 20
    assert np.all((labels[a] == labels[b]) == same)
    a, b, same = verification_pairs(np.arange(5), max_pairs=40)  # no identity twice
    assert len(same) == 0


def test_pyproject_flower_config_lists_every_run_setting():
    """`flwr run . -c key=value` only accepts keys declared in pyproject.toml."""
    import tomllib
    from pathlib import Path

    from fedface.config import FLOWER_CONFIGS

    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    defaults: dict = {}
    for config in FLOWER_CONFIGS:  # every config Flower carries; no key in two of them
        own = config().to_run_config()
        assert not set(own) & set(defaults), f"{config.__name__} reuses keys"
        defaults.update(own)
    assert set(declared) == set(defaults)
    assert {k: v for k, v in declared.items() if k != "out"} == {
        k: v for k, v in defaults.items() if k != "out"}
    assert pyproject["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "server.app:app", "clientapp": "client.app:app"}


def test_hold_out_images_keeps_every_held_out_person_in_training():
    from fedface.data.partition import hold_out_images

    labels = np.repeat(np.arange(6), [1, 2, 3, 4, 5, 8])
    idx = np.arange(len(labels))
    train, held = hold_out_images(labels, idx, 1, seed=0)
    assert set(train) | set(held) == set(idx) and not set(train) & set(held)
    assert sorted(labels[held]) == [2, 3, 4, 5]  # only identities with >= 3 images give one
    train2, held2 = hold_out_images(labels, idx, 2, seed=0)
    assert sorted(labels[held2]) == [3, 3, 4, 4, 5, 5]
    assert np.array_equal(held, hold_out_images(labels, idx, 1, seed=0)[1])  # seeded


def test_prepared_holdout_images_carry_their_training_label(tmp_path):
    """Held-out chips leave training and keep the label their person has in the client's
    head: the same federation without holdout trains on exactly those chips, with those
    labels."""
    from fedface.data.prepare import prepare

    cfg = RunConfig(synthetic_identities=40, synthetic_images=6, image_size=32, num_clients=2,
                    holdout_images=1, cache_dir=str(tmp_path))
    plain_cfg = RunConfig(**{**cfg.to_dict(), "holdout_images": 0})
    assert cfg.data_key() != plain_cfg.data_key()
    data, plain = prepare(cfg), prepare(plain_cfg)
    for k, summary in enumerate(data.summary["clients"]):
        cd, ref = data.load_client(k), plain.load_client(k)
        assert summary["holdout_images"] == len(cd.y_holdout) > 0
        assert len(cd.y_train) + len(cd.y_holdout) == len(ref.y_train)
        assert cd.num_classes == ref.num_classes
        flat = ref.x_train.reshape(len(ref.x_train), -1)
        for x, y in zip(cd.x_holdout, cd.y_holdout):
            (match,) = np.flatnonzero((flat == x.reshape(-1)).all(1))
            assert ref.y_train[match] == y
            assert not (cd.x_train.reshape(len(cd.x_train), -1) == x.reshape(-1)).all(1).any()


def test_a_prepared_synthetic_federation_from_another_generator_folder_is_rebuilt(tmp_path):
    import json

    from fedface.data.prepare import prepare

    cfg = RunConfig(synthetic_identities=20, synthetic_images=4, image_size=32, num_clients=2,
                    cache_dir=str(tmp_path))
    first = prepare(cfg)
    report = first.root / "report.json"
    meta = json.loads(report.read_text())
    real_root = meta["summary"]["root"]
    meta["summary"]["root"] = str(tmp_path / "synthetic" / "an-older-generator")
    report.write_text(json.dumps(meta))
    assert prepare(cfg).summary["root"] == real_root  # rebuilt, not reused
    assert prepare(cfg).summary["prepare_seconds"] == json.loads(report.read_text())[
        "summary"]["prepare_seconds"]  # and then reused


def test_a_capability_config_gets_reading_coercion_and_collected_problems_from_the_base():
    from dataclasses import dataclass

    from fedface.config import FlatConfig

    @dataclass
    class Blur(FlatConfig):
        WHAT = "anonymizer configuration"
        kernel: int = 9
        strength: float = 1.0

        def problems(self) -> list[str]:
            out = []
            if self.kernel % 2 == 0:
                out.append(f"kernel={self.kernel}: use an odd size")
            if self.strength <= 0:
                out.append(f"strength={self.strength}: use a value > 0")
            return out

    b = Blur.from_run_config({"kernel": "5", "strength": 2})
    assert (b.kernel, b.strength) == (5, 2.0) and b.to_run_config() == {"kernel": 5, "strength": 2.0}
    with pytest.raises(ValueError, match="Invalid anonymizer configuration: kernel=4.*; strength=0"):
        Blur(kernel=4, strength=0)
    with pytest.raises(ValueError, match=r"Unknown run-config keys \['sigma'\]. Valid keys: kernel, str"):
        Blur.from_run_config({"sigma": 1})
    with pytest.raises(ValueError, match="kernel='x' is not a valid int"):
        Blur.from_run_config({"kernel": "x"})
