"""What the scripts in ``recipes/`` share and no library already does; not part of the installed hf_helu.
``python recipes/run_<task>.py`` puts ``recipes/`` on ``sys.path`` (the tests: pytest's ``pythonpath``). It is the
only code of this repository that imports accelerate, datasets, peft, scipy and soundfile."""
