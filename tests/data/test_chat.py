"""Chat templates and loss masks: built-in and Jinja templates, record checks, template errors."""

import json

import numpy as np
import pytest

from megalite.config import ConfigError
from megalite.data.chat import (
    BadRecord,
    ChatMLTemplate,
    Llama3Template,
    conversation_from_record,
    encode_conversation,
    encode_prompt,
    load_chat_template,
    preference_from_record,
)
from megalite.data.tokenizer import build_tokenizer

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "Another, über-small?"},
    {"role": "assistant", "content": "Two — the smallest."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome!"},
]
ANSWERS = [m["content"] for m in CONV if m["role"] == "assistant"]

# Written for these tests in the style of Llama-3's published template (bos, header tokens, eot).
LLAMA3_JINJA = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content']"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# The same with HF's {% generation %} markers around what an assistant turn is trained on.
LLAMA3_JINJA_GEN = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
)


def runs(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs (start, end, value) of nonzero mask values."""
    out, i = [], 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j] == mask[i]:
                j += 1
            out.append((i, j, int(mask[i])))
            i = j
        else:
            i += 1
    return out


def expected_llama3(tok, messages) -> list[int]:
    ids = [tok.bos]
    for m in messages:
        ids += [tok.chat_tokens["<|start_header_id|>"], *m["role"].encode(), tok.chat_tokens["<|end_header_id|>"],
                *b"\n\n", *m["content"].encode(), tok.chat_tokens["<|eot_id|>"]]
    return ids


def test_byte_tokenizer_reserves_chat_tokens_above_the_bytes():
    tok = build_tokenizer("byte")
    assert set(tok.chat_tokens) == {"<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
                                    "<|eot_id|>"}
    assert min(tok.chat_tokens.values()) >= 256 and max(tok.chat_tokens.values()) < tok.vocab_size
    assert len({*tok.chat_tokens.values(), tok.bos, tok.eos, tok.pad}) == 8


def test_default_template_masks_exactly_the_assistant_turns():
    tok = build_tokenizer("byte")
    template = load_chat_template("auto", tok)
    assert isinstance(template, Llama3Template)
    ids, mask = encode_conversation(template, tok, CONV)
    assert ids.tolist() == expected_llama3(tok, CONV)
    eot = tok.chat_tokens["<|eot_id|>"]
    spans = runs(mask)
    # One run per assistant turn: its content and its end-of-turn token, 2 only on the last turn.
    assert [ids[a:b].tolist() for a, b, _ in spans] == [[*a.encode(), eot] for a in ANSWERS]
    assert [v for _, _, v in spans] == [1, 1, 2]
    assert int((mask > 0).sum()) == sum(len(a.encode()) + 1 for a in ANSWERS)
    # loss_on=last keeps the last turn only.
    assert ids[mask == 2].tolist() == [*ANSWERS[-1].encode(), eot]


def test_chatml_and_raw_templates():
    tok = build_tokenizer("byte")
    ids, mask = encode_conversation(load_chat_template("chatml", tok), tok, CONV)
    end = tok.chat_tokens["<|im_end|>"]
    assert [ids[a:b].tolist() for a, b, _ in runs(mask)] == [[*a.encode(), end] for a in ANSWERS]
    ids, mask = encode_conversation(load_chat_template("raw", tok), tok, conversation_from_record(
        {"prompt": "1+1=", "completion": "2"}))
    assert ids.tolist() == [*b"1+1=2", tok.eos] and mask.tolist() == [0, 0, 0, 0, 2, 2]


@pytest.mark.parametrize("source", [LLAMA3_JINJA, LLAMA3_JINJA_GEN], ids=["prefixes", "generation-markers"])
def test_jinja_template_from_tokenizer_config_matches_the_builtin(tmp_path, source):
    tok = build_tokenizer("byte")
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": source, "bos_token": "<s>", "eos_token": "</s>"}))
    template = load_chat_template(str(cfg), tok)
    assert template.name == "jinja"
    ids, mask = encode_conversation(template, tok, CONV)
    ref_ids, ref_mask = encode_conversation(Llama3Template(tok), tok, CONV)
    assert ids.tolist() == ref_ids.tolist() and mask.tolist() == ref_mask.tolist()
    if source is LLAMA3_JINJA:
        assert encode_prompt(template, tok, CONV[:2]) == encode_prompt(Llama3Template(tok), tok, CONV[:2])


def test_jinja_spans_include_what_the_template_emits_after_a_turn(tmp_path):
    """ChatML as Jinja: the prefix rule puts the newline after <|im_end|> into the span."""
    tok = build_tokenizer("byte")
    src = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    path = tmp_path / "chatml.jinja"
    path.write_text(src)
    ids, mask = encode_conversation(load_chat_template(str(path), tok), tok, CONV)
    ref_ids, _ = encode_conversation(ChatMLTemplate(tok), tok, CONV)
    assert ids.tolist() == ref_ids.tolist()
    end = tok.chat_tokens["<|im_end|>"]
    assert [ids[a:b].tolist() for a, b, _ in runs(mask)] == [[*a.encode(), end, 10] for a in ANSWERS]


def test_jinja_template_found_beside_a_hf_tokenizer(tmp_path):
    """`auto` with an HF tokenizer.json uses the chat_template of the tokenizer_config.json next to it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    hf.train_from_iterator([m["content"] for m in CONV] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": LLAMA3_JINJA, "bos_token": {"content": "<|begin_of_text|>"}}))
    tok = build_tokenizer("hf", str(tmp_path / "tokenizer.json"))
    template = load_chat_template("auto", tok, str(tmp_path / "tokenizer.json"))
    assert template.name == "jinja"
    ids, mask = encode_conversation(template, tok, CONV)
    assert ids[0] == tok.token_id("<|begin_of_text|>")
    assert [tok.decode(ids[a:b].tolist()) for a, b, _ in runs(mask)] == [a + "<|eot_id|>" for a in ANSWERS]
    assert [v for *_, v in runs(mask)] == [1, 1, 2]
    ref_ids, ref_mask = encode_conversation(Llama3Template(tok), tok, CONV)
    assert ids.tolist() == ref_ids.tolist() and mask.tolist() == ref_mask.tolist()


def test_malformed_or_unusable_templates_are_one_line_errors(tmp_path):
    tok = build_tokenizer("byte")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ConfigError, match=r"bad\.jinja: malformed chat template: .*\(template line 1\)") as e:
        load_chat_template(str(bad), tok)
    assert "\n" not in str(e.value)
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ConfigError, match="no chat_template"):
        load_chat_template(str(cfg), tok)
    with pytest.raises(ConfigError, match="neither auto"):
        load_chat_template("llama9", tok)
    # A template whose rendering of a prefix is not a prefix of the whole cannot locate turns.
    unstable = tmp_path / "unstable.jinja"
    unstable.write_text("{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(BadRecord, match="not prefix-stable"):
        encode_conversation(load_chat_template(str(unstable), tok), tok, CONV)
    raising = tmp_path / "raising.jinja"
    raising.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}")
    with pytest.raises(BadRecord, match="no system role"):
        encode_conversation(load_chat_template(str(raising), tok), tok, CONV)


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "x"}, "missing field 'completion'"),
    ({"conversation": []}, "missing field 'messages'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " \n"}]},
     r"messages\[1\]: empty assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, "missing field 'content'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "x\ud800"}, {"role": "assistant", "content": "y"}]},
     "lone surrogate"),
    ([1, 2], "not a JSON object"),
])
def test_bad_conversation_records(record, reason):
    with pytest.raises(BadRecord, match=reason):
        conversation_from_record(record)


def test_preference_records():
    chosen, rejected = preference_from_record({"prompt": CONV[:2], "chosen": "Seven.",
                                               "rejected": [{"role": "assistant", "content": "Nine."}]})
    assert chosen == CONV[:3] and rejected[:2] == CONV[:2] and rejected[2]["content"] == "Nine."
    with pytest.raises(BadRecord, match="missing field 'rejected'"):
        preference_from_record({"prompt": "p", "chosen": "c"})
    with pytest.raises(BadRecord, match="rejected: empty assistant turn"):
        preference_from_record({"prompt": "p", "chosen": "c", "rejected": ""})
    with pytest.raises(BadRecord, match="must be assistant text"):
        preference_from_record({"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"})
