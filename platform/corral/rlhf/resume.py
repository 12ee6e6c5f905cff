"""Resumable state of an RLHF step (PPO, rejection sampling): what lets a re-run continue.

`StepState` saves, every `save_every` iterations (rounds), into `<output_dir>/state/`:
- `policy/`, `critic/`: each trained role's DeepSpeed checkpoint (`DeepSpeedStrategy.save`: every
  rank's shard of the model, optimizer and scheduler, and its RNG), written by all its ranks;
- `driver.pt`: the loop's own state (next iteration, the driver's generators, history, the
  held-out scores from before training), read back with `torch.load(weights_only=True)`.
A save is atomic: it is written to `state.partial/` and renamed into place, the previous save kept
as `state.old/` until then, so a crash mid-save leaves the last complete one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from corral.rlhf.actors import RoleGroup

DRIVER_FILE = "driver.pt"


class StepState:
    """The `state/` directory of one step's output, for the trained `roles` of `group`."""

    def __init__(self, out: Path, group: RoleGroup, roles: tuple[str, ...]):
        self.dir, self.group, self.roles = Path(out) / "state", group, roles
        self.partial, self.old = self.dir.with_name("state.partial"), self.dir.with_name("state.old")

    def _complete(self) -> Path | None:
        """The last complete save: `state/`, or `state.old/` when a crash fell between the two renames."""
        for d in (self.dir, self.old):
            if (d / DRIVER_FILE).is_file():
                return d
        return None

    def load(self) -> dict | None:
        """Restore every trained role from the last save and return the driver's state; None if no save."""
        d = self._complete()
        if d is None:
            return None
        self.group.get({role: self.group.remote(role, "load_state", str(d / role)) for role in self.roles},
                       "loading the saved state")
        driver = torch.load(d / DRIVER_FILE, weights_only=True)
        print(f"resuming from {d}: iteration {driver['next']}", flush=True)
        return driver

    def save(self, driver: dict) -> None:
        """Every trained role's checkpoint and the driver's state, atomically (see the module doc)."""
        shutil.rmtree(self.partial, ignore_errors=True)
        self.group.get({role: self.group.remote(role, "save_state", str(self.partial / role), {"next": driver["next"]})
                        for role in self.roles}, "saving the state")
        self.partial.mkdir(parents=True, exist_ok=True)
        torch.save(driver, self.partial / DRIVER_FILE)
        if self.dir.exists():
            shutil.rmtree(self.old, ignore_errors=True)
            self.dir.rename(self.old)
        self.partial.rename(self.dir)
        shutil.rmtree(self.old, ignore_errors=True)
