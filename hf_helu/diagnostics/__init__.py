"""Dying-unit diagnostics: which FFN units never fire, how sparse the FFN is, what HeLU's margin rescues.

:class:`ActivationMonitor` (``monitor.py``, with the cross-process reduction) hooks the activation modules and
counts; ``tally.py`` holds each module's on-device counters; :class:`ActivationStats` and
:class:`LayerActivationStats` (``stats.py``) are what it reports; :func:`plot_dead_fraction` (``plot.py``) draws
the dead fraction per layer over training; :func:`decode_sparsity` (``decode.py``) counts the zeros while a causal
LM decodes. The ``hf-helu inspect-activations`` command is in :mod:`hf_helu.cli`.
"""

from hf_helu.diagnostics.decode import decode_sparsity
from hf_helu.diagnostics.monitor import ActivationMonitor
from hf_helu.diagnostics.plot import plot_dead_fraction
from hf_helu.diagnostics.stats import ActivationStats, LayerActivationStats

__all__ = ["ActivationMonitor", "ActivationStats", "LayerActivationStats", "decode_sparsity", "plot_dead_fraction"]
