"""The membership-inference audit: the loss-threshold attacks, its pools, a run's audit."""

import numpy as np
import pytest
import torch

from fedface.config import RunConfig
from fedface.data.prepare import prepare
from fedface.data.synthetic import SyntheticConfig, generate
from fedface.models import build_backbone, build_head
from fedface.models.io import save_backbone
from fedface.privacy import (
    audit_client,
    audit_run,
    client_state_dir,
    head_file,
    head_prefix,
    membership_inference_auc,
    people_split,
    records_split,
    saved_heads,
)
from fedface.privacy.attacks import LABEL_FREE, TRUE_LABEL
from fedface.training import train_epochs


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast, and far faster on a busy machine (no spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(classes, size=32, seed=0):
    torch.manual_seed(seed)
    return (build_backbone("tinyface", embedding_size=32, input_size=size),
            build_head("softmax", 32, classes))


def _overfit(backbone, head, x, y, seed=0):
    train_epochs(backbone, head, x, y, epochs=60, batch_size=16, lr=0.05, seed=seed)


def test_true_label_attack_tells_training_images_from_held_out_images_of_the_same_people():
    # 24 people x 4 images: 2 each trained on, 2 held out; 8 other people never seen.
    x, y = generate(SyntheticConfig(num_identities=32, images_per_identity=4, size=32))
    seen, held = y < 24, np.zeros(len(y), bool)
    for p in range(24):
        held[np.flatnonzero(y == p)[:2]] = True
    xt, yt, xh, yh = x[seen & ~held], y[seen & ~held], x[seen & held], y[seen & held]
    m, n = records_split(yt, yh, seed=0)
    assert len(m) == len(n) == 48
    backbone, head = _tiny(classes=24)
    fresh = membership_inference_auc(backbone, head, xt[m], xh[n], yt[m], yh[n])
    _overfit(backbone, head, xt, yt)
    trained = membership_inference_auc(backbone, head, xt[m], xh[n], yt[m], yh[n])

    assert fresh["attack"] == trained["attack"] == TRUE_LABEL
    assert set(trained["by_loss"]) == {TRUE_LABEL, *LABEL_FREE}
    assert abs(fresh["auc"] - 0.5) < 0.15
    true = trained["by_loss"][TRUE_LABEL]
    assert trained["auc"] == true["auc"] > 0.8
    assert trained["advantage"] == pytest.approx(2 * (trained["auc"] - 0.5))
    assert true["member_loss"] < 0.5 < 2.0 < true["non_member_loss"]
    # The headline is the true-label attack, not whichever loss did best.
    assert trained["strongest"] == max(trained["by_loss"], key=lambda k: trained["by_loss"][k]["auc"])
    assert trained["members"] == trained["non_members"] == 48

    # Person level: other people have no class, only the label-free attacks apply and
    # the headline is the stronger of them.
    people = membership_inference_auc(backbone, head, xt[m], x[~seen])
    assert set(people["by_loss"]) == set(LABEL_FREE) and people["attack"] in LABEL_FREE
    assert people["auc"] == max(v["auc"] for v in people["by_loss"].values()) > 0.75

    with pytest.raises(ValueError, match="at least one member"):
        membership_inference_auc(backbone, head, x[:0], x)
    with pytest.raises(ValueError, match="both members and non-members"):
        membership_inference_auc(backbone, head, xt[m], xh[n], yt[m])
    with pytest.raises(ValueError, match=r"\[0, 24\)"):
        membership_inference_auc(backbone, head, xt[m], x[~seen], yt[m], y[~seen])


def test_record_members_come_only_from_people_with_held_out_images_matched_per_person():
    # People 0..5 train with 4, 1, 5, 3, 2, 6 images; 1, 2, 3 and 5 have held-out images.
    y_train = np.repeat(np.arange(6), [4, 1, 5, 3, 2, 6])
    y_holdout = np.array([1, 1, 1, 2, 3, 3, 5])
    m, n = records_split(y_train, y_holdout, seed=0)
    # Each person gives min(train, held-out) of each: 1 (person 1), 1, 2, 1.
    for person, k in {1: 1, 2: 1, 3: 2, 5: 1}.items():
        assert (y_train[m] == person).sum() == (y_holdout[n] == person).sum() == k
    assert set(y_train[m]) == {1, 2, 3, 5}  # never 0 or 4: they have no non-member
    assert len(set(m)) == len(m) == 5 and len(set(n)) == len(n) == 5
    # Seeded; the cap counts whole people (both sides stay matched).
    assert all(np.array_equal(a, b) for a, b in zip(records_split(y_train, y_holdout, seed=0), (m, n)))
    m2, n2 = records_split(y_train, y_holdout, max_images=2, seed=0)
    assert 1 <= len(n2) == len(m2) <= 2
    assert sorted(y_train[m2]) == sorted(y_holdout[n2])

    # People audit: the institution's people vs other people, at most 2 images a person.
    y_other = np.repeat(np.arange(4), [1, 7, 3, 2])
    pm, pn = people_split(y_train, y_other, per_person_images=2, seed=0)
    assert np.bincount(y_train[pm], minlength=6).tolist() == [2, 1, 2, 2, 2, 2]
    assert np.bincount(y_other[pn], minlength=4).tolist() == [1, 2, 2, 2]
    pm, pn = people_split(y_train, y_other, per_person_images=2, max_images=5, seed=0)
    assert len(pm) <= 5 and len(pn) <= 5 and np.bincount(y_train[pm]).max() <= 2


def test_audit_run_reads_the_runs_model_and_each_institutions_newest_head(tmp_path):
    cfg = RunConfig(synthetic_identities=40, synthetic_images=5, image_size=32, num_clients=2,
                    partition_alpha=100.0, holdout_images=1, out=str(tmp_path / "run"))
    data = prepare(cfg)
    cd = data.load_client(0)
    backbone = build_backbone(cfg.backbone, embedding_size=cfg.embedding_size, input_size=32)
    head = build_head(cfg.head, cfg.embedding_size, cd.num_classes)
    _overfit(backbone, head, cd.x_train, cd.y_train)
    save_backbone(tmp_path / "run" / "model.pt", backbone, cfg.backbone, cfg.embedding_size, 32)
    # Institution 0's heads as the client names them: an older round (unreadable, so it
    # must not be read), the newest, and head momentum (another prefix). Institution 1
    # kept no head: it is not audited.
    folder = client_state_dir(cfg.out)
    folder.mkdir(parents=True)
    head_file(folder, head_prefix(0), 1).write_bytes(b"not a head")
    torch.save(head.state_dict(), head_file(folder, head_prefix(0), 2))
    (folder / "client_000_headm_r00002.pt").write_bytes(b"not a head either")
    assert head_file(folder, head_prefix(0), 2).name == "client_000_head_r00002.pt"
    assert head_prefix() == "head"  # a node's own state folder (deployment)
    assert sorted(saved_heads(folder, head_prefix(0))) == [1, 2]

    rows = audit_run(cfg)
    assert [(r["client"], r["head_round"]) for r in rows] == [(0, 2)]
    rec, ppl = rows[0]["records"], rows[0]["people"]
    held_people = len(np.unique(cd.y_holdout))
    assert rec["attack"] == TRUE_LABEL and rec["members"] == rec["non_members"] == held_people
    assert rec["auc"] > 0.7  # overfit: the true-label attack sees its training images
    assert ppl["attack"] in LABEL_FREE and ppl["non_members"] == 2 * len(np.unique(cd.y_val))
    assert ppl["members"] == 2 * cd.num_classes
    # The same numbers as auditing institution 0 directly, seeded by (seed, client).
    backbone.eval()
    direct = audit_client(backbone, head, cd, seed=(cfg.seed, 0))
    assert rec == direct["records"] and ppl == direct["people"]

    # A head that does not fit the institution is refused, naming the file.
    bad = build_head(cfg.head, cfg.embedding_size, cd.num_classes + 1)
    torch.save(bad.state_dict(), head_file(folder, head_prefix(0), 3))
    with pytest.raises(ValueError, match="client_000_head_r00003.pt does not fit institution 0"):
        audit_run(cfg)
