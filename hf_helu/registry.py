"""Registration of HeLU in transformers' activation table, so ``hidden_act="helu"`` just works.

transformers builds activations with ``ACT2FN[config.hidden_act]``. ``register()`` adds ``"helu"``
(alpha ``DEFAULT_ALPHA``, 0.05) and teaches the table the parametrised names ``"helu_<alpha>"``
(``"helu_0.1"``), so a config carries its alpha in the activation string itself and survives
``save_pretrained`` / ``from_pretrained`` with no extra attribute.
"""

from __future__ import annotations

from transformers import activations

from hf_helu.activation import ACTIVATION_NAME, HeLU, parse_activation_name


class _HeLUClassInstantier(activations.ClassInstantier):
    """transformers' ``ClassInstantier`` that also resolves ``"helu_<alpha>"`` names on demand."""

    def __missing__(self, key):
        alpha = parse_activation_name(key)
        if alpha is None:
            raise KeyError(key)
        return HeLU, {"alpha": alpha}

    def __contains__(self, key) -> bool:
        if super().__contains__(key):
            return True
        try:
            return parse_activation_name(key) is not None
        except ValueError:
            return False


def register() -> None:
    """Add HeLU to ``ACT2CLS`` and ``ACT2FN``. Idempotent; refuses to replace another ``"helu"``."""
    for table in (activations.ACT2CLS, activations.ACT2FN):
        existing = dict.get(table, ACTIVATION_NAME)
        if existing is not None and existing is not HeLU:
            raise RuntimeError(
                f"transformers.activations already maps {ACTIVATION_NAME!r} to {existing!r}; "
                "hf_helu will not replace another activation"
            )
        table[ACTIVATION_NAME] = HeLU
    table = activations.ACT2FN
    if not isinstance(table, _HeLUClassInstantier):
        if type(table) is not activations.ClassInstantier:
            raise RuntimeError(
                f"transformers.activations.ACT2FN is a {type(table).__name__}, not the ClassInstantier "
                "hf_helu extends; 'helu' works, parametrised 'helu_<alpha>' names do not"
            )
        table.__class__ = _HeLUClassInstantier
