"""Chat records to token ids and a per-token loss mask: record checks, chat templates, encoding.

A conversation is a list of {"role": system|user|assistant, "content": str}. A template turns it
into segments, each either text or literal token ids, with a mask value: 0 for tokens that carry no
loss, 1 for an earlier assistant turn, 2 for the last assistant turn (so `data.loss_on: all|last`
is chosen at train time, not baked into the shards). An assistant turn's mask covers its content
and the template's end-of-turn marker, so the model learns to stop.

Templates: `llama3` (<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>, after bos),
`chatml` (<|im_start|>role\\n content <|im_end|>\\n), `raw` (contents concatenated, eos after each
assistant turn), or a Jinja `chat_template` (HF tokenizer_config.json or a .jinja file). For Jinja,
assistant spans come from `{% generation %}` blocks when the template has them, else from rendering
prefixes of the conversation: turn i spans from the end of render(messages[:i], generation prompt)
to the end of render(messages[:i+1]).
"""

from __future__ import annotations

import abc
import datetime
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megalite.config import ConfigError
from megalite.data.tokenizer import BOS_NAMES, EOS_NAMES, PAD_NAMES, Tokenizer

ROLES = ("system", "user", "assistant")
NO_LOSS, EARLIER_TURN, LAST_TURN = 0, 1, 2
TEMPLATE_NAMES = ("auto", "llama3", "chatml", "raw")

Message = dict[str, str]
# A piece of a rendered conversation: text to tokenize or literal ids, and its mask value.
Segment = tuple[str | list[int], int]


class BadRecord(ValueError):
    """A record that cannot be trained on; the message is the reason, the caller adds file:line."""


# ---------------------------------------------------------------------------------------------
# Record checks.


def check_text(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise BadRecord(f"{where}: expected a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON "\ud800" decodes to a lone surrogate, which UTF-8 cannot hold
        raise BadRecord(f"{where}: lone surrogate {text[e.start]!r} at character {e.start}") from None
    return text


def parse_messages(value: Any, field: str = "messages") -> list[Message]:
    """Checked messages: a non-empty list of {role, content}; assistant turns must not be empty."""
    if not isinstance(value, list) or not value:
        raise BadRecord(f"'{field}' must be a non-empty list of messages")
    out = []
    for k, m in enumerate(value):
        where = f"{field}[{k}]"
        if not isinstance(m, dict):
            raise BadRecord(f"{where}: not an object")
        for key in ("role", "content"):
            if key not in m:
                raise BadRecord(f"{where}: missing field '{key}'")
        role = m["role"]
        if role not in ROLES:
            raise BadRecord(f"{where}: unknown role {role!r} (expected {'|'.join(ROLES)})")
        content = check_text(m["content"], f"{where}.content")
        if role == "assistant" and not content.strip():
            raise BadRecord(f"{where}: empty assistant turn")
        out.append({"role": role, "content": content})
    return out


def _require(obj: dict, *fields: str) -> None:
    for f in fields:
        if f not in obj:
            raise BadRecord(f"missing field '{f}'")


def _turns(value: Any, field: str, role: str) -> list[Message]:
    """A text field as one turn of `role`, or a list of messages."""
    if isinstance(value, str):
        content = check_text(value, field)
        if role == "assistant" and not content.strip():
            raise BadRecord(f"{field}: empty assistant turn")
        return [{"role": role, "content": content}]
    return parse_messages(value, field)


def conversation_from_record(obj: Any) -> list[Message]:
    """{"messages": [...]} or {"prompt": text|messages, "completion": text|messages}."""
    if not isinstance(obj, dict):
        raise BadRecord("not a JSON object")
    if "messages" in obj:
        messages = parse_messages(obj["messages"])
    elif "prompt" in obj or "completion" in obj:
        _require(obj, "prompt", "completion")
        messages = _turns(obj["prompt"], "prompt", "user") + _turns(obj["completion"], "completion", "assistant")
    else:
        raise BadRecord("missing field 'messages' (or 'prompt' and 'completion')")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn: the loss mask would be empty")
    return messages


def preference_from_record(obj: Any) -> tuple[list[Message], list[Message]]:
    """{"prompt": text|messages, "chosen": text|[assistant msg], "rejected": ...} -> the chosen and
    rejected conversations (the prompt followed by one assistant turn each)."""
    if not isinstance(obj, dict):
        raise BadRecord("not a JSON object")
    _require(obj, "prompt", "chosen", "rejected")
    prompt = _turns(obj["prompt"], "prompt", "user")
    answers = []
    for field in ("chosen", "rejected"):
        turn = _turns(obj[field], field, "assistant")
        if len(turn) != 1 or turn[0]["role"] != "assistant":
            raise BadRecord(f"'{field}' must be assistant text (or a list of one assistant message)")
        answers.append(prompt + turn)
    return answers[0], answers[1]


# ---------------------------------------------------------------------------------------------
# Templates.


def _mask_values(messages: Sequence[Message]) -> list[int]:
    """Per message: 0 for system/user, 1 for an assistant turn, 2 for the last assistant turn."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return [LAST_TURN if i == last else EARLIER_TURN if m["role"] == "assistant" else NO_LOSS
            for i, m in enumerate(messages)]


def _special(tok: Tokenizer, piece: str) -> int:
    i = tok.chat_tokens.get(piece)
    if i is None:
        i = tok.token_id(piece)
    if i is None:
        raise ConfigError(f"the {tok.name} tokenizer has no {piece} token (retrain it with tools/train_tokenizer.py, "
                          "which reserves the chat tokens, or pick another chat template)")
    return i


class ChatTemplate(abc.ABC):
    name: str

    @abc.abstractmethod
    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[Segment]:
        """The conversation as segments; with add_generation_prompt, ending in an assistant header."""


class Llama3Template(ChatTemplate):
    name = "llama3"

    def __init__(self, tok: Tokenizer) -> None:
        self.sh, self.eh = _special(tok, "<|start_header_id|>"), _special(tok, "<|end_header_id|>")
        self.eot, self.bos = _special(tok, "<|eot_id|>"), tok.bos

    def _header(self, role: str) -> list[Segment]:
        return [([self.sh], 0), (role, 0), ([self.eh], 0), ("\n\n", 0)]

    def segments(self, messages, add_generation_prompt=False):
        out: list[Segment] = [([self.bos], 0)]
        for m, v in zip(messages, _mask_values(messages)):
            out += self._header(m["role"]) + [(m["content"], v), ([self.eot], v)]
        if add_generation_prompt:
            out += self._header("assistant")
        return out


class ChatMLTemplate(ChatTemplate):
    name = "chatml"

    def __init__(self, tok: Tokenizer) -> None:
        self.start, self.end = _special(tok, "<|im_start|>"), _special(tok, "<|im_end|>")

    def segments(self, messages, add_generation_prompt=False):
        out: list[Segment] = []
        for m, v in zip(messages, _mask_values(messages)):
            out += [([self.start], 0), (m["role"] + "\n", 0), (m["content"], v), ([self.end], v), ("\n", 0)]
        if add_generation_prompt:
            out += [([self.start], 0), ("assistant\n", 0)]
        return out


class RawTemplate(ChatTemplate):
    """No markers: contents back to back, eos after each assistant turn (prompt/completion tuning)."""

    name = "raw"

    def __init__(self, tok: Tokenizer) -> None:
        self.eos = tok.eos

    def segments(self, messages, add_generation_prompt=False):
        out: list[Segment] = []
        for m, v in zip(messages, _mask_values(messages)):
            out.append((m["content"], v))
            if m["role"] == "assistant":
                out.append(([self.eos], v))
        return out


# Sentinels wrapped around {% generation %} blocks (private-use code points; records holding them are
# refused so a span can never be forged by content).
_GEN_OPEN, _GEN_CLOSE = "\ue000", "\ue001"


def _jinja_env():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (HF's marker for assistant tokens) -> sentinels."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_wrap"), [], [], body).set_lineno(lineno)

        def _wrap(self, caller):
            return _GEN_OPEN + caller() + _GEN_CLOSE

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    # Llama-3.1-style templates print today's date into the system turn.
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class JinjaTemplate(ChatTemplate):
    """A Jinja chat template as HF renders them (messages, bos_token, eos_token, add_generation_prompt)."""

    name = "jinja"

    def __init__(self, source: str, origin: str, tok: Tokenizer, bos_token: str | None = None,
                 eos_token: str | None = None) -> None:
        import jinja2

        self.origin = origin
        try:
            self.template = _jinja_env().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"{origin}: malformed chat template: {e.message} (template line {e.lineno})") from None
        self.has_generation = re.search(r"{%-?\s*generation\s*-?%}", source) is not None
        self.specials = _special_pieces(tok)
        self.bos_token = bos_token or _piece_of(tok.bos, self.specials) or ""
        self.eos_token = eos_token or _piece_of(tok.eos, self.specials) or ""
        names = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        try:
            return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as e:  # noqa: BLE001 - raise_exception(), undefined names, errors in template code
            raise BadRecord(f"chat template {self.origin}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                            ) from None

    def _spans(self, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int, int]]]:
        """The rendered text and its assistant spans (start, end, mask value) in characters."""
        values = _mask_values(messages)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if any(_GEN_OPEN in m["content"] or _GEN_CLOSE in m["content"] for m in messages):
            raise BadRecord("content holds the private-use characters U+E000/U+E001 reserved for span markers")
        if self.has_generation:
            raw = self.render(messages, False)
            parts = re.split(f"([{_GEN_OPEN}{_GEN_CLOSE}])", raw)
            text, spans, start, depth = "", [], 0, 0
            for p in parts:
                if p == _GEN_OPEN:
                    depth, start = depth + 1, len(text)
                elif p == _GEN_CLOSE:
                    depth -= 1
                    spans.append((start, len(text)))
                else:
                    text += p
            if depth != 0 or len(spans) != len(assistant):
                raise BadRecord(f"chat template {self.origin}: {len(spans)} {{% generation %}} blocks for "
                                f"{len(assistant)} assistant turns")
            return text, [(a, b, values[i]) for (a, b), i in zip(spans, assistant)]
        full = self.render(messages, False)
        spans = []
        for i in assistant:
            before = self.render(messages[:i], True)
            upto = self.render(messages[: i + 1], False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise BadRecord(f"chat template {self.origin}: rendering is not prefix-stable at message {i}, so "
                                "assistant tokens cannot be located; mark them with {% generation %} blocks")
            spans.append((len(before), len(upto), values[i]))
        return full, spans

    def _pieces(self, text: str, value: int) -> list[Segment]:
        """Text with the special pieces cut out as literal ids (every backend then agrees on them)."""
        if not text:
            return []
        if self._split is None:
            return [(text, value)]
        return [([self.specials[p]], value) if p in self.specials else (p, value)
                for p in self._split.split(text) if p]

    def segments(self, messages, add_generation_prompt=False):
        if add_generation_prompt:
            return self._pieces(self.render(messages, True), 0)
        text, spans = self._spans(messages)
        out: list[Segment] = []
        at = 0
        for a, b, v in spans:
            out += self._pieces(text[at:a], 0) + self._pieces(text[a:b], v)
            at = b
        return out + self._pieces(text[at:], 0)


def _special_pieces(tok: Tokenizer) -> dict[str, int]:
    out = dict(tok.chat_tokens)
    for name in BOS_NAMES + EOS_NAMES + PAD_NAMES:
        i = tok.token_id(name)
        if i is not None:
            out[name] = i
    return out


def _piece_of(token: int, specials: dict[str, int]) -> str | None:
    return next((p for p, i in specials.items() if i == token), None)


def _config_token(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _jinja_from_config(path: Path, tok: Tokenizer) -> JinjaTemplate | None:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the tokenizer config ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the tokenizer config is not a JSON object")
    source = cfg.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is None:
        return None
    if not isinstance(source, str):
        raise ConfigError(f"{path}: chat_template must be a string (or a list with a 'default' entry)")
    return JinjaTemplate(source, str(path), tok, _config_token(cfg.get("bos_token")),
                         _config_token(cfg.get("eos_token")))


def load_chat_template(spec: str, tok: Tokenizer, tokenizer_model: str = "") -> ChatTemplate:
    """`auto` (the tokenizer's own Jinja template if its tokenizer_config.json has one, else llama3
    when the vocabulary has Llama-3's header tokens, else chatml), `llama3`, `chatml`, `raw`, a
    tokenizer_config.json, or a Jinja file."""
    spec = spec or "auto"
    if spec == "auto":
        if tokenizer_model:
            model = Path(tokenizer_model)
            cfg = (model if model.is_dir() else model.parent) / "tokenizer_config.json"
            if cfg.is_file() and (t := _jinja_from_config(cfg, tok)) is not None:
                return t
        if all(p in tok.chat_tokens for p in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")):
            return Llama3Template(tok)
        if all(p in tok.chat_tokens for p in ("<|im_start|>", "<|im_end|>")):
            return ChatMLTemplate(tok)
        raise ConfigError(f"the {tok.name} tokenizer has no chat tokens for a default template; retrain it with "
                          "tools/train_tokenizer.py, give a Jinja chat template, or use the raw template")
    builtin = {"llama3": Llama3Template, "default": Llama3Template, "chatml": ChatMLTemplate, "raw": RawTemplate}
    if spec in builtin:
        return builtin[spec](tok)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"chat template '{spec}': neither {'|'.join(TEMPLATE_NAMES)} nor a file")
    if path.suffix == ".json":
        t = _jinja_from_config(path, tok)
        if t is None:
            raise ConfigError(f"{path}: no chat_template in this tokenizer config")
        return t
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the chat template ({e})") from None
    return JinjaTemplate(source, str(path), tok)


# ---------------------------------------------------------------------------------------------
# Encoding.


def encode_segments(tok: Tokenizer, plans: Sequence[Sequence[Segment]], dtype: np.dtype | type = np.int64
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, uint8 mask) per plan; all text segments of all plans go through one batch encode."""
    texts = [s for plan in plans for s, _ in plan if isinstance(s, str)]
    encoded = iter(tok.encode_batch(texts)) if texts else iter(())
    out = []
    for plan in plans:
        ids: list[int] = []
        mask: list[int] = []
        for s, v in plan:
            piece = next(encoded) if isinstance(s, str) else s
            ids += piece
            mask += [v] * len(piece)
        out.append((np.asarray(ids, dtype=dtype), np.asarray(mask, dtype=np.uint8)))
    return out


def encode_conversation(template: ChatTemplate, tok: Tokenizer, messages: Sequence[Message]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of one conversation; mask 1/2 on earlier/last assistant turns, 0 elsewhere."""
    return encode_segments(tok, [template.segments(messages)])[0]


def encode_prompt(template: ChatTemplate, tok: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids of a conversation followed by the assistant header: what generation continues."""
    return encode_segments(tok, [template.segments(messages, add_generation_prompt=True)])[0][0].tolist()



# ---------------------------------------------------------------------------------------------
# Shard names: tokens in `<prefix>_<mode>_document`, the mask beside them in `<prefix>_<mode>_mask`.

CHAT_MODES = ("chat", "preference")


def shard_prefixes(output_prefix: str, mode: str) -> tuple[str, str]:
    """(tokens prefix, mask prefix) that `preprocess_data.py --mode chat|preference` writes."""
    return f"{output_prefix}_{mode}_document", f"{output_prefix}_{mode}_mask"


def mask_prefix_of(tokens_prefix: str) -> str:
    """The mask shard beside a token shard: P_chat_document -> P_chat_mask."""
    base = tokens_prefix[: -len("_document")] if tokens_prefix.endswith("_document") else tokens_prefix
    return base + "_mask"
