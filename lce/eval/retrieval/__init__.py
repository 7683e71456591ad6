"""Retrieval evaluations on a depth x length grid: passkey retrieval (one key or several ordinal keys),
needle-in-a-haystack in real text and RULER's synthetic tasks (``ruler``: its eight NIAH variants, variable tracking,
common and frequent words extraction, each a ``ruler_*`` task), with greedy decoding and a resumable JSONL result
store. This docstring describes passkey and needle; ``lce.eval.retrieval.ruler`` describes RULER's tasks.

Passkey (Landmark Attention's template, Mohtashami & Jaggi, arXiv:2305.16300; used by Position Interpolation,
arXiv:2306.15595, and YaRN, arXiv:2309.00071; code: jquesnelle/yarn ``eval/passkey.py``, LongLoRA
``passkey_retrivial.py`` and ChunkLlama ``passkey/test_passkey.py``): the lines

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you
    about the important information there.
    <filler before>
    The pass key is 12345. Remember it. 12345 is the pass key.
    <filler after>
    What is the pass key? The pass key is

joined with ``\\n``, where the filler repeats "The grass is green. The sky is blue. The sun is yellow. Here we go.
There and back again." The references size the prompt in characters and place the key at a random character; here
the prompt is sized in **tokens** and built from whole filler sentences: the haystack has the most sentences whose
prompt still fits in the target length (so the prompt is at most ``length`` tokens and less than one sentence
short of it), and the key line goes after ``round(depth * n)`` of the ``n`` sentences, so the fraction of haystack
tokens before the key is ``depth`` to within one sentence. Keys have exactly ``key_digits`` digits (the references
draw ``randint(1, 50000)``, one to five digits).

Multi-key (yarn ``eval/passkey_hard.py``): ``num_keys`` lines "The 2nd pass key is ... is the 2nd pass key.", the
question asks for one of them ("What is the 2nd pass key? The 2nd pass key is"); the asked key sits at the
requested depth, the others at random sentence boundaries; ordinals follow the order of appearance (English
ordinals; the reference's ``order()`` has typos that make it print "12st" or "3th"). ``haystack="corpus"`` uses real
text, as the reference does with RedPajama/PG19.

Needle-in-a-haystack (ChunkLlama ``needle_in_a_haystack/``, EasyContext ``eval_needle.py``): a needle sentence with a
``key_digits``-digit number inserted at a sentence boundary of real text from an lce data source, the question
appended; the answer is checked by integer or substring match.

Chat prompts (``chat``; ``auto``: when the tokenizer has a chat template, as an instruct model's does): the prompt
above without its answer lead is the one user message, rendered by the tokenizer's chat template with the generation
prompt, and the lead ("The pass key is") starts the assistant's reply, so that greedy decoding continues with the
digits, as in the plain prompt; SmolLM2-135M-Instruct's:

    <|im_start|>system
    You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    <|im_start|>user
    There is an important info hidden inside a lot of irrelevant text. ...
    What is the pass key?<|im_end|>
    <|im_start|>assistant
    The pass key is

The system turn is the template's default unless ``system`` is set. The whole templated text is encoded at once, so
its special tokens become their ids and its tokens count in the length the haystack is fitted to; no BOS is added
(the template writes one if the model wants it: SmolLM2's BOS is ``<|im_start|>``, which would come twice); for
SmolLM2 the ids are exactly ``apply_chat_template(tokenize=True)``'s followed by the lead's. Generation stops at the
tokenizer's eos (``<|im_end|>``, the end of the assistant's turn). Rows of chat prompts hold ``chat: true`` and the
chat fields in their protocol; plain prompts carry no chat fields.

Decoding is greedy (``max_new_tokens``, stop at eos) with the KV cache; the prefill keeps the logits of the last
position only, so a long prompt never builds ``T x V`` logits. The answer is the first integer in the generated text
(see ``parse_integer``). Every trial is one row appended to a ``lce.eval.store.ResultStore``; its identity is the
sweep's ``point_key`` plus ``depth`` and ``trial``, and prompts are a pure function of (seed, task, length, depth,
trial), so a killed evaluation resumes where it stopped, with the same prompts, no row lost or duplicated. As in the
sweep, two runs of one evaluation at once write each trial once (``ResultStore.append_unless_done``), and of a trial
a file already holds twice the first finished row counts (``lce.eval.store.first_finished``). No row holds a
non-finite number: a model whose logits are NaN still decodes some tokens, and its trials are ``ok`` and wrong.
"""

import importlib
import pkgutil

from lce.eval.retrieval.generate import GenerateFn, greedy_generate, model_generate_fn
from lce.eval.retrieval.needle import NeedleConfig
from lce.eval.retrieval.passkey import PasskeyConfig
from lce.eval.retrieval.prompt import Prompt, PromptBuilder, chat_frame, corpus_text, text_units, uses_chat
from lce.eval.retrieval.run import KIND, TRIAL_FIELDS, cell_accuracy, is_correct, retrieval_key, run_retrieval
from lce.eval.retrieval.tasks import (
    ANSWER_LEAD,
    CHAT_FIELDS,
    FILLER,
    GRID_FIELDS,
    KEY_LINE,
    ORDINAL_ANSWER_LEAD,
    ORDINAL_KEY_LINE,
    ORDINAL_QUESTION,
    QUESTION,
    RETRIEVALS,
    TASK_DESCRIPTION,
    GridTask,
    PromptTexts,
    build_retrieval,
    iter_cells,
    ordinal,
    parse_integer,
)

for _module in pkgutil.iter_modules(__path__):  # every task module registers itself: adding a task is adding one
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ANSWER_LEAD", "CHAT_FIELDS", "FILLER", "GRID_FIELDS", "KEY_LINE", "KIND", "ORDINAL_ANSWER_LEAD",
    "ORDINAL_KEY_LINE", "ORDINAL_QUESTION", "QUESTION", "RETRIEVALS", "TASK_DESCRIPTION", "TRIAL_FIELDS", "GenerateFn",
    "GridTask", "NeedleConfig", "PasskeyConfig", "Prompt", "PromptBuilder", "PromptTexts", "build_retrieval",
    "cell_accuracy", "chat_frame", "corpus_text", "greedy_generate", "is_correct", "iter_cells", "model_generate_fn",
    "ordinal", "parse_integer", "retrieval_key", "run_retrieval", "text_units", "uses_chat",
]
