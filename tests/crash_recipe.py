"""Run a recipe's ``main`` with a crash injected after its N-th optimizer step (for the resume tests).

    python tests/crash_recipe.py RECIPE.py N [recipe options...]

Wraps accelerate's ``AcceleratedOptimizer.step`` so that the (N+1)-th real optimizer step (one that ends an
accumulation window) ends the process with an abrupt ``os._exit(3)`` (like a kill: no cleanup, no final save)
before it updates anything: what step N left (its checkpoint, if due, and the annealer's step) is all there is.
"""

from __future__ import annotations

import os
import sys

from accelerate.optimizer import AcceleratedOptimizer
from helpers import REPO, load_script

sys.path.insert(0, str(REPO / "recipes"))  # as `python recipes/run_x.py` has it: recipe_support beside the recipes

EXIT_STATUS = 3


def crash_after(steps: int):
    """An ``AcceleratedOptimizer.step`` that ends the process instead of running optimizer step ``steps + 1``."""
    step = AcceleratedOptimizer.step
    done = 0

    def crashing_step(self, *args, **kwargs):
        nonlocal done
        if self.gradient_state.sync_gradients:
            if done >= steps:
                print(f"simulated crash after step {done}", flush=True)
                os._exit(EXIT_STATUS)
            done += 1
        return step(self, *args, **kwargs)

    return crashing_step


def main(argv: list[str]) -> None:
    path, steps, *recipe_argv = argv
    recipe = load_script(path, "crashing_recipe")
    AcceleratedOptimizer.step = crash_after(int(steps))
    recipe.main(recipe_argv)


if __name__ == "__main__":
    main(sys.argv[1:])
