"""DeepSpeed for the outer step: the config dict, the ZeRO-stage check and the engine.

The second-order step runs its forwards through ``engine.module`` (never
``engine(...)``: DeepSpeed's output hooks break ``autograd.grad``), then
``engine.backward(loss)`` reduces the gradients across workers and
``engine.step()`` clips and applies Adam. ZeRO 0, 1 and 2 give exactly the
reference gradients; ZeRO-3 partitions parameters to empty placeholders outside
the engine's own forward, which the functional inner step cannot use, so it is
refused up front.
"""

from __future__ import annotations

import os
import sys

from raymeta.config import ConfigError

SUPPORTED_ZERO_STAGES = (0, 1, 2)


def check_zero_stage(train_cfg) -> None:
    """Raise ConfigError for ZeRO stages the second-order meta step cannot run under."""
    stage = train_cfg.zero_stage
    if stage == 3:
        raise ConfigError(
            "train.zero_stage=3 is not supported: ZeRO-3 partitions parameters outside the "
            "engine's forward, and the meta step's inner update (functional_call over adapted "
            "parameters, autograd.grad with create_graph=True) needs the full parameters. "
            "Use train.zero_stage=0, 1 or 2 (2 also partitions gradients and optimizer state)."
        )
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(
            f"train.zero_stage: {stage!r} is not one of {list(SUPPORTED_ZERO_STAGES)}"
        )


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed config dict of a RunConfig for ``world_size`` workers."""
    check_zero_stage(cfg.train)
    meta = cfg.meta
    per_worker = meta.meta_batch_size // world_size
    ds = {
        "train_batch_size": per_worker * world_size,
        "train_micro_batch_size_per_gpu": per_worker,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(meta.clip_norm),
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": meta.outer_lr,
                "torch_adam": True,
                "adam_w_mode": False,
                "fused": True,  # torch.optim.Adam's fused kernel: one pass per step
            },
        },
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return ds


def skip_shm_build() -> None:
    """Stop DeepSpeed from JIT-compiling its CPU shared-memory op (needs g++, ~25 s).

    The op only speeds up intra-node CPU collectives; gloo does the same work."""
    import deepspeed.comm.torch  # noqa: F401  (the module object lives in sys.modules)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_engine(model, cfg, world_size: int):
    """A DeepSpeed engine around ``model`` (the process group must exist, or one process).

    In one process with no group yet, it starts a one-rank gloo group and destroys it at
    interpreter exit: a gloo group left to the interpreter's teardown can abort the process
    after its work is done ("terminate called without an active exception")."""
    import atexit

    import torch.distributed as dist

    if not dist.is_initialized() and world_size == 1:
        # One process outside a launcher: DeepSpeed wants the env:// rendezvous variables.
        for key, value in (
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
        ):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    skip_shm_build()
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
        atexit.register(destroy_own_group)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, config=deepspeed_config(cfg, world_size)
    )
    return engine


def destroy_own_group() -> None:
    """Destroy the process group :func:`init_engine` started, if it is still there."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
