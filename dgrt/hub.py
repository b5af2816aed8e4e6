"""Hugging Face Hub model ids wherever dgrt takes a checkpoint folder.

`resolve("google/diffusiongemma-26B-A4B-it")` downloads the checkpoint's safetensors, configs and
tokenizer into the standard Hub cache (or finds them there) and returns the snapshot folder; a local path
comes back as it is. huggingface_hub does the work, so its settings apply: HF_HUB_CACHE / HF_HOME for the
cache, HF_HUB_OFFLINE=1 to stay off the network, HF_TOKEN or `hf auth login` for gated models, its
progress bars on stderr.
"""

from __future__ import annotations

import re
from os import PathLike
from pathlib import Path

from dgrt.errors import DgrtError

# What dgrt reads from a checkpoint repository; never *.bin / *.pth pickles, GGUF or original/ copies.
CHECKPOINT_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]
# owner/name as the Hub spells repository ids (a name, one slash, a name; no leading dot).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


def is_model_id(source: str | PathLike[str]) -> bool:
    """True where `source` names no local file or folder and reads as a Hub repository id."""
    text = str(source)
    return not Path(text).exists() and _REPO_ID.fullmatch(text) is not None and ".." not in text


def resolve(source: str | PathLike[str], revision: str | None = None) -> Path:
    """A checkpoint folder: `source` itself, or the cached snapshot of the Hub model it names."""
    if not is_model_id(source):
        return Path(source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    model_id, at = str(source), f" at revision {revision}" if revision else ""
    try:
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=CHECKPOINT_FILES))
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no connection"
        fetch = f"hf download {model_id}" + (f" --revision {revision}" if revision else "")
        raise DgrtError(
            f"{model_id}{at} is not a local folder and not in the Hugging Face cache, and the Hub cannot be "
            f"reached ({why}); fetch it once where it can (`{fetch}`) or pass a checkpoint folder."
        ) from None
    except GatedRepoError:
        raise DgrtError(
            f"{model_id} is gated on the Hugging Face Hub: accept its license on the model page, then log in "
            "with `hf auth login` (or set HF_TOKEN)."
        ) from None
    except RevisionNotFoundError:
        raise DgrtError(f"{model_id} has no revision {revision!r} on the Hugging Face Hub.") from None
    except RepositoryNotFoundError:
        raise DgrtError(
            f"{model_id} is not a local folder, and no model of that id is on the Hugging Face Hub "
            "(or it is private: log in with `hf auth login`)."
        ) from None
