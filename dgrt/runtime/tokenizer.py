"""The checkpoint's tokenizer (tokenizer.json) and chat template (tokenizer_config.json), without transformers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from dgrt.config import read_json
from dgrt.errors import DgrtError

_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token")


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any], source: str = "tokenizer_config.json"):
        """config: tokenizer_config.json's content; source names it in errors."""
        self._tok = tokenizer
        self.config = config
        # Special tokens as the chat template sees them: transformers also writes them as AddedToken objects.
        self._special = {key: _token_text(config.get(key), key, source) for key in _SPECIAL_TOKENS}
        template = _default_template(config.get("chat_template"), source)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            self._template = None if template is None else env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise DgrtError(f"{source}: 'chat_template' is not a valid Jinja template ({e}).") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise DgrtError(f"{path}: no tokenizer.json (expected the checkpoint's tokenizer files).")
        try:
            tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises plain Exceptions for every parse error
            raise DgrtError(f"{tok_file}: not a tokenizer the tokenizers library can read ({e}).") from None
        cfg_file = path / "tokenizer_config.json"
        config = read_json(cfg_file) if cfg_file.exists() else {}
        return cls(tok, config, str(cfg_file))

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
        try:
            text = self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **self._special
            )
        except Exception as e:  # the template is the checkpoint's code: any error in it is the input's
            raise DgrtError(f"the chat template failed on these messages ({type(e).__name__}: {e}).") from None
        return self.encode(text)


def _token_text(value: Any, key: str, source: str) -> str | None:
    """A special token's text from tokenizer_config.json: a string, an AddedToken object, or null."""
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise DgrtError(
            f"{source}: '{key}' is {value!r:.60}, expected a string (or an object with a 'content' string)."
        )
    return text


def _default_template(value: Any, source: str) -> str | None:
    """The chat template: a string, or transformers' list of named templates (the one named "default")."""
    named = isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    )
    if not (value is None or isinstance(value, str) or named):
        raise DgrtError(
            f"{source}: 'chat_template' is {value!r:.60}, expected a Jinja template string (or a list of "
            "{name, template} objects)."
        )
    return {t["name"]: t["template"] for t in value}.get("default") if named else value
