"""How many sampling steps an image-to-image pass runs, as the WebUI counts them.

A pass at ``denoise`` starts part-way down a noise schedule and runs its tail. Plain
img2img and inpaint keep the schedule of ``steps`` and run about denoise x steps of it;
the hires pass (and an explicit step count) runs exactly ``steps`` as the tail of a longer
schedule. Both give the schedule length and how many of its last steps run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tail:
    schedule: int  # steps of the full schedule (what set_timesteps is given)
    run: int  # how many of its last steps are run

    @property
    def start(self) -> int:
        """Index of the first step run."""
        return self.schedule - self.run


def img2img(steps: int, denoise: float) -> Tail:
    """Plain img2img: t_enc = int(min(denoise, 0.999) x steps), and t_enc + 1 steps run."""
    if denoise <= 0:
        return Tail(steps, 0)
    return Tail(steps, min(int(min(denoise, 0.999) * steps) + 1, steps))


def exact(steps: int, denoise: float) -> Tail:
    """Exactly ``steps`` steps, the tail of a schedule of int(steps / min(denoise, 0.999))."""
    if denoise <= 0:
        return Tail(steps, 0)
    return Tail(int(steps / min(denoise, 0.999)), steps)
