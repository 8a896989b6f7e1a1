"""How many replicas `loopgpt serve --ray` runs, in Ray Serve's vocabulary: plain data that both the command
line (scale_out.py) and the Ray module (ray_serve.py) use, so neither imports the other.

    python -c "from loopgpt.server.scaling import Scaling; print(Scaling(autoscale=(1, 4)).ray_options(8))"
"""

from __future__ import annotations

from dataclasses import dataclass


class ScaleOutError(ValueError):
    """A --ray flag combination that cannot run; the message says what to change."""


@dataclass(frozen=True)
class Scaling:
    """How many replicas: a fixed count, or Ray's autoscaler between two bounds."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max)
    target_ongoing: int | None = None  # requests per replica the autoscaler aims at

    def ray_options(self, max_batch: int) -> dict:
        """The deployment's replica-count options in Ray Serve's own vocabulary."""
        if self.autoscale is None:
            return {"num_replicas": self.replicas}
        low, high = self.autoscale
        # A full batch per replica is the natural target: past it, requests queue inside the engine.
        return {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                       "target_ongoing_requests": self.target_ongoing or max_batch}}

    @property
    def most(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas
