"""What a run tells the person watching it: a bar over images (ETA, images/s), a per-step
bar on request, or plain lines for CI logs."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, mode: str, total: int, done: int = 0):
        self.mode = mode
        self.images = None
        self.steps = None
        if mode != "quiet":
            self.images = tqdm(total=total, initial=done, unit="img", desc="images",
                               dynamic_ncols=True, file=sys.stderr)

    def step(self, i: int, n: int) -> None:
        if self.mode != "steps":
            return
        if self.steps is None or i == 1:
            if self.steps is not None:
                self.steps.close()
            self.steps = tqdm(total=n, unit="step", desc="  steps", leave=False,
                              dynamic_ncols=True, file=sys.stderr)
        self.steps.update(1)

    def stage(self, kind: str, stack: str) -> None:
        """The stage (and model stack) of the batch just started, beside the bar."""
        if self.images is not None:
            self.images.set_postfix_str(f"{kind} on {stack}" if stack else kind, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.images is not None:
            self.images.update(n)

    def close(self) -> None:
        for bar in (self.steps, self.images):
            if bar is not None:
                bar.close()
