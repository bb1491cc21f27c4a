"""Checkpoints of the distributed outer loop: DeepSpeed state plus the loop's own state.

A checkpoint directory holds the DeepSpeed checkpoint under the tag ``step<N>``
(model, optimizer and, with ZeRO 1/2, each rank's optimizer partition), written
by every rank, and ``loop_state.json`` (rank 0): the objective, the number of
steps done, the sampler :class:`~raymeta.data.tasks.Position` and the log of
steps done so far (step number and the attempt that ran it). The final
checkpoint also holds ``model/``, the trained weights written with
``save_pretrained``, which the driver loads for evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from raymeta.data.tasks import Position

STATE_FILE = "loop_state.json"
MODEL_DIR = "model"


@dataclass
class LoopState:
    """Where the outer loop stands: resumable from a checkpoint."""

    objective: str
    step: int = 0
    """Outer steps done."""
    position: Position = field(default_factory=Position)
    """The sampler position of the next step."""
    attempt: int = 0
    """How many times this run has resumed from a checkpoint (0 = the first attempt)."""
    steps_log: list[list[int]] = field(default_factory=list)
    """``[step, attempt]`` for every step done, in order (lets tests check exactly-once)."""

    def to_json(self) -> dict:
        return {
            "objective": self.objective,
            "step": self.step,
            "position": {"epoch": self.position.epoch, "step": self.position.step},
            "attempt": self.attempt,
            "steps_log": self.steps_log,
        }


def state_from_json(d: dict) -> LoopState:
    """The LoopState written by :meth:`LoopState.to_json`."""
    return LoopState(
        objective=d["objective"],
        step=int(d["step"]),
        position=Position(**d["position"]),
        attempt=int(d.get("attempt", 0)),
        steps_log=[list(x) for x in d.get("steps_log", [])],
    )


def save_checkpoint(engine, state: LoopState, directory: str | Path, rank: int) -> Path:
    """Write the engine (every rank must call this) and, on rank 0, the loop state."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=f"step{state.step}")
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(state.to_json(), indent=1))
    return directory


def read_state(directory: str | Path) -> LoopState:
    """The loop state of a checkpoint directory."""
    return state_from_json(json.loads((Path(directory) / STATE_FILE).read_text()))


def load_checkpoint(engine, directory: str | Path) -> LoopState:
    """Restore the engine (model and optimizer) and return the loop state to continue from."""
    state = read_state(directory)
    path, _ = engine.load_checkpoint(str(directory), tag=f"step{state.step}")
    if path is None:
        raise RuntimeError(f"no DeepSpeed checkpoint step{state.step} in {directory}")
    return state
