"""Run a recipe's ``main`` with a crash injected after its N-th optimizer step, or inside its N-th checkpoint save
(for the resume tests).

    python tests/crash_recipe.py RECIPE.py N [recipe options...]
    python tests/crash_recipe.py RECIPE.py save:N [recipe options...]

N: wraps accelerate's ``AcceleratedOptimizer.step`` so that the (N+1)-th real optimizer step (one that ends an
accumulation window) ends the process with an abrupt ``os._exit(3)`` (like a kill: no cleanup, no final save)
before it updates anything: what step N left (its checkpoint, if due, and the annealer's step) is all there is.
save:N: the N-th ``accelerator.save_state`` ends the process the same way after it has written the model and
optimizer, before the registered run state.
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


def crash_in_save(saves: int):
    """accelerate's ``save_custom_state`` (run state, written after the weights) ending the ``saves``-th save."""
    import accelerate.accelerator

    save, done = accelerate.accelerator.save_custom_state, [0]

    def crashing_save(*args, **kwargs):
        done[0] += 1
        if done[0] == saves:
            print(f"simulated crash inside checkpoint save {saves}", flush=True)
            os._exit(EXIT_STATUS)
        return save(*args, **kwargs)

    accelerate.accelerator.save_custom_state = crashing_save


def main(argv: list[str]) -> None:
    path, when, *recipe_argv = argv
    recipe = load_script(path, "crashing_recipe")
    if when.startswith("save:"):
        crash_in_save(int(when.removeprefix("save:")))
    else:
        AcceleratedOptimizer.step = crash_after(int(when))
    recipe.main(recipe_argv)


if __name__ == "__main__":
    main(sys.argv[1:])
