"""End to end: a resumed DP run replays its private randomness bit for bit."""

import pytest
import torch

from fedface.config import RunConfig


@pytest.mark.slow
def test_a_resumed_dp_run_replays_its_private_randomness_bit_for_bit(tmp_path):
    """The secrets live in the institutions' state folder (``OUT/clients`` in simulation).
    The same institutions (the same secrets) stopped after round 2 and resumed end with
    exactly the model of the run that never stopped; institutions with fresh secrets
    and the same config end elsewhere."""
    import shutil

    from fedface.models.io import load_backbone
    from fedface.runner import resume_config, run

    base = dict(synthetic_identities=60, synthetic_images=6, image_size=48, num_clients=3,
                rounds=3, batch_size=8, min_train_nodes=3, local_epochs=1, dp_epsilon=8.0)
    run(RunConfig(**base, out=str(tmp_path / "full")))
    secrets = sorted((tmp_path / "full" / "clients").glob("*_randomness.key"))
    assert len(secrets) == 3
    (tmp_path / "stopped" / "clients").mkdir(parents=True)
    for f in secrets:  # the same three institutions run again
        shutil.copy2(f, tmp_path / "stopped" / "clients" / f.name)
    run(RunConfig(**base, pause_after=2, out=str(tmp_path / "stopped")))
    resumed = run(resume_config(str(tmp_path / "stopped")), resume=True)
    assert resumed["resumed_after_round"] == 2
    run(RunConfig(**base, out=str(tmp_path / "other")))
    full, back, other = (load_backbone(tmp_path / d / "model.pt")[0].state_dict()
                         for d in ("full", "stopped", "other"))
    assert all(torch.equal(full[k], back[k]) for k in full)  # bit-exact after resume
    assert not all(torch.equal(full[k], other[k]) for k in full)  # fresh secrets: other noise
