"""End to end: a resumed DP run replays its private randomness bit for bit."""

import pytest
import torch

from fedface.config import RunConfig


@pytest.mark.slow
def test_a_resumed_dp_run_replays_its_private_randomness_bit_for_bit(tmp_path):
    """The secrets live in the institutions' state folder (``OUT/clients`` in simulation).
    The same institutions (the same secrets) stopped after round 1 and resumed end with
    exactly the model of the run that never stopped. (That fresh secrets draw other
    noise under the same config is tested without training:
    ``test_dp_noise_comes_from_the_institutions_secret_not_the_run_config``.)"""
    import shutil

    from fedface.models.io import load_backbone
    from fedface.runner import resume_config, run

    base = dict(synthetic_identities=60, synthetic_images=6, image_size=48, num_clients=3,
                rounds=2, batch_size=8, min_train_nodes=3, local_epochs=1, dp_epsilon=8.0)
    run(RunConfig(**base, out=str(tmp_path / "full")))
    secrets = sorted((tmp_path / "full" / "clients").glob("*_randomness.key"))
    assert len(secrets) == 3
    (tmp_path / "stopped" / "clients").mkdir(parents=True)
    for f in secrets:  # the same three institutions run again
        shutil.copy2(f, tmp_path / "stopped" / "clients" / f.name)
    run(RunConfig(**base, pause_after=1, out=str(tmp_path / "stopped")))
    resumed = run(resume_config(str(tmp_path / "stopped")), resume=True)
    assert resumed["resumed_after_round"] == 1 and resumed["rounds"][-1]["dp"]["epsilon_max"] > 0
    full, back = (load_backbone(tmp_path / d / "model.pt")[0].state_dict()
                  for d in ("full", "stopped"))
    assert all(torch.equal(full[k], back[k]) for k in full)  # bit-exact after resume
