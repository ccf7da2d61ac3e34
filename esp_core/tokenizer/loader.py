"""`load_tokenizer(model)`: "builtin" -> ByteTokenizer; a directory or a .gguf file (or a
packaged model name, see esp_core.runtime.model_source) -> HFTokenizer.

Reads, from an HF model directory, only data files:
  tokenizer.json             the tokenizer itself (required); its post-processor alone decides
                             what encode(add_special_tokens=True) adds (BOS...), as in
                             transformers 5: add_bos_token/add_eos_token flags are ignored
  tokenizer_config.json      bos/eos/pad tokens, chat_template, model_max_length
  special_tokens_map.json    legacy bos/eos (used where tokenizer_config has none)
  chat_template.jinja        the template as saved by newer transformers (wins over the config)
  chat_template.json         {"chat_template": ...} as saved by processors
  generation_config.json     eos_token_id (int or list): more ids that end generation
Nothing is imported or executed from the directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFRustTokenizer

from esp_core.tokenizer.base import Tokenizer
from esp_core.tokenizer.byte_tokenizer import ByteTokenizer
from esp_core.tokenizer.errors import TokenizerError
from esp_core.tokenizer.hf_tokenizer import HFTokenizer

BUILTIN = "builtin"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers writes int(1e30) when a tokenizer has no length limit
_NO_LIMIT = 10**20


def load_tokenizer(model: str | Path) -> Tokenizer:
    """The tokenizer for a model: "builtin" or a local HF directory (never a hub id)."""
    if str(model) == BUILTIN:
        return ByteTokenizer(BUILTIN)
    from esp_core.runtime.model_source import PACKAGED_MODELS, ModelSourceError, resolve_model_path

    if str(model) in PACKAGED_MODELS:
        try:
            model = resolve_model_path(str(model))
        except ModelSourceError as exc:
            raise TokenizerError(str(exc)) from None
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        from esp_core.tokenizer.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if not path.is_dir():
        raise TokenizerError(
            f"tokenizer {str(model)!r}: not 'builtin' and not a directory or a .gguf file (only local "
            "files are supported; nothing is downloaded)"
        )
    return _load_hf_dir(path)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token from a config: a string or a serialized AddedToken {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_chat_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {name, template} (use
    "default", else the first)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


def _load_hf_dir(path: Path) -> HFTokenizer:
    backend, decoder_config = _read_backend(path)
    config = _read_json(path / "tokenizer_config.json")
    legacy_map = _read_json(path / "special_tokens_map.json")
    _add_config_tokens(path, backend, config.get("added_tokens_decoder"))
    special_map = _special_tokens(config, legacy_map)
    for key in ("bos_token", "eos_token"):
        text = special_map.get(key)
        if text is not None and backend.token_to_id(text) is None:
            raise TokenizerError(f"{path}: {key} {text!r} is not in the vocabulary")

    gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
    extra_eos = [gen_eos] if isinstance(gen_eos, int) else [i for i in (gen_eos or []) if isinstance(i, int)]
    max_len = config.get("model_max_length")
    max_len = int(max_len) if isinstance(max_len, (int, float)) and 0 < max_len < _NO_LIMIT else None
    return HFTokenizer(
        str(path),
        backend,
        decoder_config,
        bos_token=special_map.get("bos_token"),
        eos_token=special_map.get("eos_token"),
        extra_eos_ids=extra_eos,
        special_tokens_map=special_map,
        chat_template=_chat_template(path, config),
        model_max_length=max_len,
        pad_token=special_map.get("pad_token"),
    )


def _read_backend(path: Path) -> tuple[HFRustTokenizer, Any]:
    """The `tokenizers` backend of tokenizer.json and its decoder section."""
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        hint = ""
        if (path / "tokenizer.model").is_file() or (path / "vocab.json").is_file():
            hint = " (it has slow-tokenizer files only; convert it to tokenizer.json with transformers first)"
        raise TokenizerError(f"{path}: no tokenizer.json{hint}")
    try:
        raw = tok_file.read_text(encoding="utf-8")
        return HFRustTokenizer.from_str(raw), json.loads(raw).get("decoder")
    except Exception as exc:  # tokenizers raises plain Exception on bad files
        raise TokenizerError(f"{tok_file}: not a usable tokenizer.json ({exc})") from exc


def _add_config_tokens(path: Path, backend: HFRustTokenizer, added: Any) -> None:
    """Added tokens listed only in tokenizer_config (older saves) must exist in the backend,
    with the ids the config gives them."""
    if not isinstance(added, dict):
        return
    for tid, spec in sorted(added.items(), key=lambda kv: int(kv[0])):
        content = _token_text(spec)
        if content is None or backend.token_to_id(content) is not None:
            continue
        special = bool(spec.get("special", False))
        token = AddedToken(content, special=special, normalized=bool(spec.get("normalized", False)))
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(content) != int(tid):
            raise TokenizerError(
                f"{path}: added token {content!r} would get id {backend.token_to_id(content)}, config says {tid}"
            )


def _special_tokens(config: dict[str, Any], legacy_map: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad/... texts: tokenizer_config first, then the older special_tokens_map.json."""
    special_map: dict[str, Any] = {}
    for key in _SPECIAL_KEYS:
        text = _token_text(config.get(key)) or _token_text(legacy_map.get(key))
        if text is not None:
            special_map[key] = text
    extra = config.get("additional_special_tokens") or legacy_map.get("additional_special_tokens")
    if isinstance(extra, list):
        special_map["additional_special_tokens"] = [t for t in map(_token_text, extra) if t]
    return special_map


def _chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja, else tokenizer_config's, else chat_template.json's (newest save first)."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    chat_template = _pick_chat_template(config.get("chat_template"))
    if chat_template is None:
        chat_template = _pick_chat_template(_read_json(path / "chat_template.json").get("chat_template"))
    return chat_template
