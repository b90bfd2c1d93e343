"""Prompt files for `megalite generate`, and turning a prompt record into token ids.

A `.jsonl` file holds one JSON object per line: {"prompt": "text"} or {"messages": [{"role",
"content"}, ...]} (DESIGN.md contract 7). Any other file is text, one prompt per line (blank lines
skipped; a literal "\\n" in a line stays as typed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megalite.config import ConfigError


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Records {"prompt": str} or {"messages": list}, each with "where" (file:line) for errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"generate.prompts: file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read prompts ({type(e).__name__})") from None
    records = []
    jsonl = p.suffix in (".jsonl", ".json")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        if not jsonl:
            records.append({"prompt": line, "where": where})
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{where}: not valid JSON") from None
        if not isinstance(obj, dict) or not ({"prompt", "messages"} & obj.keys()):
            raise ConfigError(f"{where}: expected an object with \"prompt\" or \"messages\"")
        if "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise ConfigError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} "
                                  "strings")
            records.append({"messages": msgs, "where": where})
        elif isinstance(obj["prompt"], str):
            records.append({"prompt": obj["prompt"], "where": where})
        else:
            raise ConfigError(f"{where}: \"prompt\" must be a string")
    if not records:
        raise ConfigError(f"{p}: no prompts in the file")
    return records


def render_prompt(tokenizer, record: dict[str, Any], chat: bool = False, tokenizer_model: str = "") -> list[int]:
    """A prompt record's token ids: text as is, or (messages, or text with `chat`) through the chat
    template followed by the assistant header, where the answer begins."""
    if "messages" in record or chat:
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        ids = render_chat(tokenizer, messages, record["where"], tokenizer_model)
    else:
        ids = tokenizer.encode(record["prompt"])
    if not ids:
        raise ConfigError(f"{record['where']}: the prompt encodes to no tokens")
    return ids


def render_chat(tokenizer, messages: list[dict], where: str, tokenizer_model: str = "") -> list[int]:
    """HOOK (chat template): megalite/data/chat.py (the SFT data work) renders conversations the way
    SFT shards are made; with the `auto` template (as preprocess_data.py's default) a prompt gets the
    same markers training saw. Until that module is merged, chat prompts stop here with one line."""
    try:
        from megalite.data.chat import BadRecord, encode_prompt, load_chat_template, parse_messages
    except ImportError:
        raise ConfigError(f"{where}: chat prompts need the chat template (megalite/data/chat.py), which is "
                          "not in this version; use plain text prompts") from None
    try:
        template = load_chat_template("auto", tokenizer, tokenizer_model)
        return encode_prompt(template, tokenizer, parse_messages(messages))
    except BadRecord as e:
        raise ConfigError(f"{where}: {e}") from None
