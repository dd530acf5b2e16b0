"""The snippets of README.md and recipes/README.md run as written from a clone.

- Python blocks run in order, each in its own namespace, in a temporary working folder. Hub names that would be
  downloaded are served by tiny stand-ins (``STAND_INS``: the packaged MiniLM tokenizer and 2-layer random models of
  the same families), so the snippets run offline; everything else (hf_helu, transformers, torch) is the real code.
- Bash blocks: each ``python recipes/run_*.py`` (or ``accelerate launch recipes/run_*.py``) command is parsed by its
  recipe's own argument parser (``parse_args``, stopped once argparse has read the flags, before the recipe's
  checks that look for files), so every flag name and value must be one the recipe takes. Installing (``pip``), the
  test suite (``python -m pytest``) and ``export`` lines are not run. The ``hf-helu`` CLI block is a synopsis with
  placeholders (SRC, DST), covered by the CLI tests.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest
import torch
from helpers import MINILM, REPO, needs_minilm

DOCS = [REPO / "README.md", REPO / "recipes" / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text(encoding="utf-8")) if lang == language]


def tiny_standin(kind: str, vocab_size: int):
    """A 2-layer random model of the family the snippet names (GELU BERT classifier, SiLU LLaMA causal LM)."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    small = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    if kind == "classifier":
        return BertForSequenceClassification(BertConfig(**small, intermediate_size=64, hidden_act="gelu"))
    return LlamaForCausalLM(LlamaConfig(**small, intermediate_size=64, num_key_value_heads=2, hidden_act="silu"))


STAND_INS = {"bert-base-uncased": "classifier", "HuggingFaceTB/SmolLM2-135M": "causal_lm"}


@pytest.fixture
def offline_hub(monkeypatch):
    """``from_pretrained`` of the hub names the snippets use returns the tiny stand-ins; other names load as usual."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizers = {kind: AutoTokenizer.from_pretrained(MINILM) for kind in set(STAND_INS.values())}
    tokenizers["causal_lm"].model_input_names = ["input_ids", "attention_mask"]  # as a decoder's tokenizer
    for auto in (AutoTokenizer, AutoModelForSequenceClassification, AutoModelForCausalLM):
        original = auto.from_pretrained

        def from_pretrained(name, *args, _original=original, _auto=auto, **kwargs):
            if name not in STAND_INS:
                return _original(name, *args, **kwargs)
            tokenizer = tokenizers[STAND_INS[name]]
            return tokenizer if _auto is AutoTokenizer else tiny_standin(STAND_INS[name], len(tokenizer))

        monkeypatch.setattr(auto, "from_pretrained", from_pretrained)


@needs_minilm
@pytest.mark.parametrize("index", range(len(blocks(REPO / "README.md", "python"))))
def test_readme_python_snippet_runs(index, offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = blocks(REPO / "README.md", "python")[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__snippet__"})


def test_readme_usage_snippet_defines_its_batches_and_total_steps():
    usage = blocks(REPO / "README.md", "python")[0]
    assert "batches = " in usage and "total_steps=" in usage  # what the snippet test above runs


class _Parsed(Exception):
    pass


def commands(path: Path) -> list[list[str]]:
    """The recipe commands of ``path``'s bash blocks: argv lists starting with the script path."""
    found = []
    for body in blocks(path, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment assignments
                words = words[1:]
            if words[:1] in (["accelerate"], ["torchrun"]):  # the launcher's own flags end at the script
                words = words[next(i for i, w in enumerate(words) if w.endswith(".py")) :]
            if words[:1] == ["python"] and words[1:2] != ["-m"]:
                words = words[1:]
            if words and words[0].startswith("recipes/") and words[0].endswith(".py"):
                found.append(words)
    return found


RECIPE_COMMANDS = [(path.relative_to(REPO).as_posix(), argv) for path in DOCS for argv in commands(path)]


def test_the_docs_hold_recipe_commands():
    scripts = {argv[0] for _, argv in RECIPE_COMMANDS}
    assert {"recipes/run_glue.py", "recipes/run_speech.py", "recipes/run_mlm.py"} <= scripts


@pytest.mark.parametrize(("doc", "argv"), RECIPE_COMMANDS, ids=[" ".join(a[:3]) for _, a in RECIPE_COMMANDS])
def test_recipe_command_parses_with_its_recipe(doc, argv, monkeypatch):
    unknown = parsed_flags(argv, doc, monkeypatch)
    if unknown:  # a comparison passes the flags it does not know on to run_glue.py
        assert argv[0] == "recipes/run_glue_compare.py", f"{doc}: {argv[0]} does not take {unknown}"
        assert not parsed_flags(["recipes/run_glue.py", "--task", "rte", *unknown], doc, monkeypatch)


def parsed_flags(argv: list[str], doc: str, monkeypatch) -> list[str]:
    """Run the recipe's ``parse_args`` until argparse has read ``argv``; return the flags its parser did not know."""
    recipe = importlib.import_module(Path(argv[0]).stem)
    parse_known_args = argparse.ArgumentParser.parse_known_args
    seen = []

    def parse(parser, args=None, namespace=None):
        seen.append(parse_known_args(parser, args, namespace)[1])
        raise _Parsed

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", parse)
        patch.setattr(argparse.ArgumentParser, "error", lambda parser, message: pytest.fail(f"{doc}: {message}"))
        with pytest.raises(_Parsed):
            recipe.parse_args(argv[1:])
    return seen[0]
