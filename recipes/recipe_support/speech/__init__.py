"""Speech data, metrics and models for the Wav2Vec2 recipe (``recipes/run_speech.py``).

- :mod:`.audio`: :class:`Clip` (one example), decoding with soundfile (no FFmpeg, no torchcodec), polyphase
  resampling (``scipy.signal.resample_poly``), the length cap, per-clip normalisation as
  ``Wav2Vec2FeatureExtractor`` does.
- :mod:`.data`: clips per split from the Free Spoken Digit Dataset, an audiofolder, or a hub dataset;
  :func:`subset_in_order` (a fixed random subset, kept in its original order).
- :mod:`.text`: class labels, transcripts, the CTC character vocabulary and tokenizer.
- :mod:`.metrics`: WER, CER, accuracy.
- :mod:`.batches`: :class:`SpeechDataset` and :class:`SpeechCollator` (padding, attention mask, -100 labels).
- :mod:`.models`: small scratch Wav2Vec2 configs and :func:`build_model`.
- :mod:`.evaluation`: Wav2Vec2 eval steps and metrics (classification; CTC greedy transcripts, WER, CER).
- :mod:`.task`: :class:`ClipSets` and :class:`TaskSetup`, what the recipe holds for one run.
- :mod:`.whisper`: Whisper models (asr and classify), a shorter encoder window, its collator, ``generate``-based
  evaluation (WER, CER, exact match).

Every name is importable from ``recipe_support.speech`` itself.
"""

from recipe_support.speech.audio import (
    SAMPLING_RATE,
    Clip,
    load_waveform,
    load_waveforms,
    max_samples,
    normalize,
    read_audio,
    resample,
)
from recipe_support.speech.batches import SpeechCollator, SpeechDataset, calibration_batches
from recipe_support.speech.data import (
    AUDIO_EXTENSIONS,
    DIGIT_WORDS,
    EVAL_SPLIT_PREFERENCE,
    FSDD_NAME,
    FSDD_TEST_INDICES,
    HELD_OUT_SPLIT,
    METADATA_FILE,
    SPLIT_NAMES,
    TRANSCRIPT_COLUMNS,
    audiofolder_splits,
    clips_from_datasets,
    fsdd_splits,
    hub_splits,
    is_fsdd_folder,
    load_splits,
    pick_eval_split,
    stratified_split,
    subset_in_order,
)
from recipe_support.speech.evaluation import classify_metrics, ctc_metrics, make_ctc_eval_step
from recipe_support.speech.metrics import accuracy, char_error_rate, word_error_rate
from recipe_support.speech.models import (
    SIZES,
    TASKS,
    build_model,
    min_input_samples,
    parse_config_overrides,
    scratch_config,
    scratch_feature_extractor,
    task_head,
)
from recipe_support.speech.task import ClipSets, TaskSetup
from recipe_support.speech.text import (
    PAD_TOKEN,
    UNK_TOKEN,
    WORD_DELIMITER,
    build_vocabulary,
    check_transcripts,
    clean_transcript,
    ctc_tokenizer,
    label_ids,
    label_names,
)
from recipe_support.speech.whisper import (
    WhisperCollator,
    build_whisper_model,
    encoder_positions,
    freeze_conv_frontend,
    is_whisper,
    load_feature_extractor,
    make_whisper_eval_step,
    normalize_text,
    shorten_encoder,
    transcript_ids,
    whisper_asr_metrics,
    whisper_encoder,
    window_seconds,
)

__all__ = [
    "AUDIO_EXTENSIONS",
    "DIGIT_WORDS",
    "EVAL_SPLIT_PREFERENCE",
    "FSDD_NAME",
    "FSDD_TEST_INDICES",
    "HELD_OUT_SPLIT",
    "METADATA_FILE",
    "PAD_TOKEN",
    "SAMPLING_RATE",
    "SIZES",
    "SPLIT_NAMES",
    "TASKS",
    "TRANSCRIPT_COLUMNS",
    "UNK_TOKEN",
    "WORD_DELIMITER",
    "Clip",
    "ClipSets",
    "SpeechCollator",
    "SpeechDataset",
    "TaskSetup",
    "WhisperCollator",
    "accuracy",
    "audiofolder_splits",
    "build_model",
    "build_vocabulary",
    "build_whisper_model",
    "calibration_batches",
    "char_error_rate",
    "check_transcripts",
    "classify_metrics",
    "clean_transcript",
    "clips_from_datasets",
    "ctc_metrics",
    "ctc_tokenizer",
    "encoder_positions",
    "freeze_conv_frontend",
    "fsdd_splits",
    "hub_splits",
    "is_fsdd_folder",
    "is_whisper",
    "label_ids",
    "label_names",
    "load_feature_extractor",
    "load_splits",
    "load_waveform",
    "load_waveforms",
    "make_ctc_eval_step",
    "make_whisper_eval_step",
    "max_samples",
    "min_input_samples",
    "normalize",
    "normalize_text",
    "parse_config_overrides",
    "pick_eval_split",
    "read_audio",
    "resample",
    "scratch_config",
    "scratch_feature_extractor",
    "shorten_encoder",
    "stratified_split",
    "subset_in_order",
    "task_head",
    "transcript_ids",
    "whisper_asr_metrics",
    "whisper_encoder",
    "window_seconds",
    "word_error_rate",
]
