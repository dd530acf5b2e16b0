"""What the scripts in ``recipes/`` share and no library already does; not part of the installed hf_helu.

``python recipes/run_<task>.py`` puts ``recipes/`` on ``sys.path``, so the recipes import it as ``recipe_support``
(the tests do so through pytest's ``pythonpath``). It is the only code of this repository that imports accelerate,
datasets, peft, scipy and soundfile.

- :mod:`~recipe_support.args`: the shared flags (transformers' example names), their one check, the settings they
  become.
- :mod:`~recipe_support.models`: one float32 model loader, the trained-head check, activation and LoRA, the
  stock-ReLU export check.
- :mod:`~recipe_support.training`: the encoder recipes' loop and what every loop shares (optimizer and schedule,
  crash-safe checkpoints on accelerate's ``save_state``, resume, the finite-loss guard, trackers, progress);
  :mod:`~recipe_support.evaluation`, :mod:`~recipe_support.results`, :mod:`~recipe_support.output_dir`:
  evaluation, outputs, the output-folder guard; :mod:`~recipe_support.hub`: model cards and ``--push_to_hub``.
- :mod:`~recipe_support.glue`, :mod:`~recipe_support.speech`, :mod:`~recipe_support.mlm`: task data and metrics.
- :mod:`~recipe_support.paths`: local data under ``$HF_HELU_DATA_DIR``.
"""
