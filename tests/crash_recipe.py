"""Run a recipe's ``main`` with a crash injected through the training loop's step hook (for the resume tests).

    python tests/crash_recipe.py RECIPE.py N [recipe options...]

Wraps the ``fit`` the recipe calls so that its ``FitHooks.on_step`` (kept, and called first) is followed by an abrupt
``os._exit(3)`` (like a kill: no cleanup, no final save) once N optimizer steps are done.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from helpers import REPO, load_script

sys.path.insert(0, str(REPO / "recipes"))  # as `python recipes/run_x.py` has it: recipe_support beside the recipes
from recipe_support.loop import FitHooks

EXIT_STATUS = 3


def crash_after(steps: int, on_step):
    """A step hook that runs ``on_step`` (if any), then ends the process once ``steps`` steps are done."""

    def hook(completed_steps: int, total_steps: int) -> None:
        if on_step is not None:
            on_step(completed_steps, total_steps)
        if completed_steps >= steps:
            print(f"simulated crash after step {completed_steps}", flush=True)
            os._exit(EXIT_STATUS)

    return hook


def main(argv: list[str]) -> None:
    path, steps, *recipe_argv = argv
    recipe = load_script(path, "crashing_recipe")
    fit = recipe.fit

    def crashing_fit(*args, hooks: FitHooks = FitHooks(), **kwargs):  # noqa: B008
        hooks = dataclasses.replace(hooks, on_step=crash_after(int(steps), hooks.on_step))
        return fit(*args, hooks=hooks, **kwargs)

    recipe.fit = crashing_fit
    recipe.main(recipe_argv)


if __name__ == "__main__":
    main(sys.argv[1:])
