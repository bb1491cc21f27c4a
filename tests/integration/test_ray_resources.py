"""A worker group a fixed local Ray cluster can never hold fails at once with a message
naming the train.* fields, instead of Ray Train retrying its start forever (real Ray)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raymeta.config import ConfigError, from_dict
from raymeta.train.launch import check_cluster_fits, fit_objective

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_two_cpus():
    """A local Ray instance with 2 CPUs and no GPU (no autoscaler: a fixed cluster)."""
    import ray

    tmp = Path(f"/tmp/rmr{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    ray.init(
        num_cpus=2,
        num_gpus=0,
        object_store_memory=128 * 1024**2,
        include_dashboard=False,
        _temp_dir=str(tmp),
    )
    yield
    ray.shutdown()


def train_cfg(**train):
    return from_dict({"train": train}).train


def test_gpu_workers_on_a_cluster_without_gpus_fail_fast(ray_two_cpus, tmp_path):
    cfg = from_dict({"train": {"use_gpu": True, "num_workers": 1}, "meta": {"objectives": ["LG"]}})
    with pytest.raises(ConfigError, match=r"train\.use_gpu=true .*has 0 GPU"):
        fit_objective(cfg, "LG", tmp_path / "no_model", [], [], tmp_path)  # before any worker
    assert not (tmp_path / "ray").exists()


def test_more_cpus_than_the_cluster_has_fail_fast(ray_two_cpus):
    with pytest.raises(ConfigError, match=r"train\.num_workers=4 x train\.cpus_per_worker=1"):
        check_cluster_fits(train_cfg(num_workers=4))
    with pytest.raises(ConfigError, match=r"train\.cpus_per_worker=3 needs 3 CPUs"):
        check_cluster_fits(train_cfg(num_workers=1, cpus_per_worker=3))


def test_a_group_that_fits_passes(ray_two_cpus):
    check_cluster_fits(train_cfg(num_workers=2, cpus_per_worker=1))


def test_a_job_that_cannot_fit_leaves_no_tracking_run(ray_two_cpus, tmp_path):
    from raymeta.train.launch import run_job

    db = tmp_path / "mlflow.db"
    cfg = from_dict(
        {
            "train": {"num_workers": 4},
            "meta": {"meta_batch_size": 4},
            "tracking": {"tracking_uri": f"sqlite:///{db}"},
        }
    )
    with pytest.raises(ConfigError, match=r"train\.num_workers=4"):
        run_job(cfg, tmp_path / "out")
    assert not db.exists() and not (tmp_path / "out").exists()
