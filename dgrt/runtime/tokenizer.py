"""The checkpoint's tokenizer (tokenizer.json) and chat template (tokenizer_config.json), without transformers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from dgrt.errors import DgrtError


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any]):
        self._tok = tokenizer
        self.config = config
        template = config.get("chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = env.from_string(template) if isinstance(template, str) else None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise DgrtError(f"{path}: no tokenizer.json (expected the checkpoint's tokenizer files).")
        try:
            tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:
            raise DgrtError(f"{tok_file}: not a readable tokenizer ({e}).") from None
        cfg_file = path / "tokenizer_config.json"
        config = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        return cls(tok, config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the checkpoint's chat template."""
        if self._template is None:
            raise DgrtError("the tokenizer has no chat_template in tokenizer_config.json; pass a plain prompt.")
        special = {k: self.config.get(k) for k in ("bos_token", "eos_token", "pad_token")}
        try:
            text = self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **special
            )
        except jinja2.TemplateError as e:
            raise DgrtError(f"the chat template failed on these messages ({e}).") from None
        return self.encode(text)
