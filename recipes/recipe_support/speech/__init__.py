"""Speech data, models and tasks for ``recipes/run_speech.py`` (Wav2Vec2-style and Whisper models); every public
name of its modules is importable from ``recipe_support.speech`` itself."""

from recipe_support.speech.audio import *  # noqa: F403
from recipe_support.speech.tasks import *  # noqa: F403
