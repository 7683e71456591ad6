"""``LceLM``: an lm-evaluation-harness model (registered as ``lce``) that loads any lce model spec and applies any lce
patch, scoring with lce's own code path.

lm-eval (EleutherAI/lm-evaluation-harness 0.4.x) asks a model for three things (``lm_eval.api.model.TemplateLM``):

- ``loglikelihood``: ``(context, continuation)`` pairs; lm-eval tokenises them (``TemplateLM._encode_pair``) and
  ``_loglikelihood_tokens`` returns the summed log-probability of the continuation tokens and whether each was the
  argmax (``is_greedy``). Here the NLL of every continuation token is ``lce.eval.loss.token_nll`` of the final hidden
  states (``lce.hf.lm.hidden_states``), the computation of ``lce.eval.perplexity.model_nll_fn``, and the model runs
  on context and continuation whole (as lce scores a window: its last token included, which matters to methods whose
  rotation depends on the input length), so a harness log-likelihood equals lce's own score of the same tokens.
- ``loglikelihood_rolling``: the log-likelihood of a whole text, for perplexity tasks. The text is cut into lm-eval's
  disjoint rolling windows (``lm_eval.utils.get_rolling_token_windows`` + ``make_disjoint_window``, the first window
  conditioned on ``prefix_token_id``) of at most ``max_length`` tokens and their scores are summed. With no length
  bound a text is one window: exactly lce's perplexity NLL of ``[prefix] + tokens``.
- ``generate_until``: greedy decoding with the KV cache until one of the ``until`` strings (or EOS) appears or
  ``max_gen_toks`` tokens are generated; the output is cut before the first stop string.

Length: ``max_length`` is what the patch supports (``lce.train.limits.supported_length``: ``factor x original
length`` for PI / YaRN / llama3 / LongRoPE, a method's own bound such as Self-Extend's ``(L - W) * G + W``), or the
``max_length`` model argument; a method without a bound (RoPE, dynamic NTK, ALiBi, NoPE, DCA, ...) scores inputs of
any length whole. Nothing is ever truncated to ``max_position_embeddings``: an input longer than ``max_length`` is an
error for ``loglikelihood`` and ``generate_until`` (lm-eval's HF model would cut its left part silently) and is split
into rolling windows for ``loglikelihood_rolling``, as lm-eval documents.

Model arguments (``--model_args k=v,...``; ``LceLM.__init__``): ``pretrained`` (a registered model name such as
``tiny_llama`` or ``smollm2``, a local directory, a ``.gguf`` file or a hub id; or a loaded model object with
``tokenizer=<lce tokenizer>``), ``posenc`` and ``attention`` (registered names), ``posenc.<field>`` /
``attention.<field>`` / ``model.<field>`` (the fields of ``conf/posenc``, ``conf/attention``, ``conf/model``), bare
keys as position-encoding parameters (``factor=4``, as ``lce.patch(model, "yarn", factor=4)``), ``dtype`` /
``revision`` / ``tokenizer`` (a name) for the model, and ``max_length``, ``max_gen_toks``, ``device``, ``backend``,
``chunk_size``, ``seed``. Unknown keys and bad values are lce's one-line ``ConfigError``.

lm-eval finds the class by name in its model registry, which it fills on import: importing this module registers
``lce`` (``python -m lce.eval.harness`` imports it, then runs lm-eval's command line).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from torch import nn
from tqdm.auto import tqdm

from lce.config import check
from lce.errors import ConfigError
from lce.eval.loss import token_nll
from lce.hf.cache import cache_keyword, returned_cache
from lce.hf.lm import hidden_states, logits_from_hidden, loss_head
from lce.kernels.backend import use_backend

#: Model arguments that configure the adapter itself (the rest are model, posenc and attention fields).
OWN_ARGS = ("pretrained", "posenc", "attention", "tokenizer", "max_length", "max_gen_toks", "device", "backend",
            "chunk_size", "seed", "batch_size", "max_batch_size")
#: Bare keys that are model fields (``conf/model``) rather than position-encoding parameters.
MODEL_SHORTCUTS = ("dtype", "revision", "trust_remote_code", "attn_implementation")
GROUPS = ("model", "posenc", "attention")

# lm-eval's registry imports its own models only while it is empty; registering "lce" first would hide them.
if "hf" not in model_registry:
    import lm_eval.models  # noqa: F401


def split_model_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Model arguments split into the adapter's own and the ``model`` / ``posenc`` / ``attention`` fields.

    ``posenc.factor=4`` and a bare ``factor=4`` are both position-encoding fields; ``model.dtype`` and ``dtype`` model
    fields. A key with another dotted prefix is a ``ConfigError``.
    """
    own: dict[str, Any] = {}
    fields: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    for key, value in args.items():
        if "." in key:
            group, _, field = key.partition(".")
            if group not in GROUPS or not field:
                raise ConfigError(f"model_args: {key}: unknown key; a dotted key names a field of "
                                  f"{', '.join(f'{g}.<field>' for g in GROUPS)}")
            fields[group][field] = value
        elif key in OWN_ARGS:
            own[key] = value
        elif key in MODEL_SHORTCUTS:
            fields["model"][key] = value
        else:
            fields["posenc"][key] = value
    return own, fields


@register_model("lce")
class LceLM(TemplateLM):
    """An lce model, patched, as an lm-evaluation-harness ``LM`` (see the module docstring for the arguments).

    Requests run one at a time (``batch_size`` is accepted and ignored): lce's patched attention scores unpadded
    windows, so every request is one forward pass of its own length.

    Args:
        pretrained: a model spec for ``lce.load_model`` or a loaded Hugging Face model (then ``tokenizer`` is its lce
            tokenizer, ``lce.data.tokenizer``).
        posenc: the position encoding to patch in (a name, a mapping with ``name`` or a config); None: the model's
            own (a checkpoint saved by lce re-applies its recorded patch), else ``rope``.
        attention: the attention variant (None: ``full``).
        max_length: the longest input; None: what the patch supports, else no bound.
        max_gen_toks: default for ``generate_until`` requests that do not set it.
        device: ``cpu``, ``cuda``, ``cuda:1``; None or ``auto``: CUDA when available.
        backend: lce's kernel backend (``auto``, ``triton``, ``ref``).
        chunk_size: logits rows materialised at once (``lce.eval.loss.token_nll``).
        seed: initialisation seed for models built from a config (``tiny_llama``).
        **fields: ``model.<f>``, ``posenc.<f>``, ``attention.<f>``, bare position-encoding parameters and model
            shortcuts (``dtype``, ``revision``, ...).
    """

    def __init__(self, pretrained: Any = "tiny_llama", posenc: Any = None, attention: Any = None,
                 tokenizer: Any = None, max_length: int | None = None, max_gen_toks: int = 256,
                 device: str | None = None, backend: str = "auto", chunk_size: int = 4096, seed: int = 0,
                 batch_size: Any = 1, max_batch_size: Any = None, **fields: Any):
        super().__init__()
        from lce.hf.models import load_model
        from lce.hf.patch import patch, patch_spec
        from lce.kernels.backend import check_backend
        from lce.train import check_device

        _, grouped = split_model_args(fields)
        check(max_length is None or (isinstance(max_length, int) and max_length >= 2), "model_args.max_length",
              f"must be an integer >= 2, got {max_length!r}")
        check(isinstance(max_gen_toks, int) and max_gen_toks >= 1, "model_args.max_gen_toks",
              f"must be an integer >= 1, got {max_gen_toks!r}")
        check(isinstance(chunk_size, int) and chunk_size >= 1, "model_args.chunk_size",
              f"must be an integer >= 1, got {chunk_size!r}")
        check_backend(backend)
        if isinstance(tokenizer, str):
            grouped["model"]["tokenizer"] = tokenizer
            tokenizer = None
        if isinstance(pretrained, nn.Module):
            check(not grouped["model"], "model_args", f"model fields {sorted(grouped['model'])} need a model spec, "
                  "not a loaded model")
            check(tokenizer is not None, "model_args.tokenizer", "a loaded model needs its lce tokenizer")
            model = pretrained
        else:
            model, tokenizer = load_model(pretrained, seed=seed, **grouped["model"])
            check(tokenizer is not None, "model_args.tokenizer",
                  f"the model {pretrained!r} holds no tokenizer; set tokenizer=<local directory or hub id>")
        if posenc is not None or attention is not None or grouped["posenc"] or grouped["attention"]:
            saved = patch_spec(model) or {}
            posenc_spec = posenc if posenc is not None else saved.get("posenc", "rope")
            attention_spec = _with_fields(attention if attention is not None else saved.get("attention", "full"),
                                          grouped["attention"])
            patch(model, posenc_spec, attention=attention_spec, **grouped["posenc"])
        self.device_ = _device(device, check_device)
        self.model = model.to(self.device_).eval()
        self.lce_tokenizer = tokenizer
        self.backend = backend
        self.chunk_size = chunk_size
        self.max_gen_toks = max_gen_toks
        self._max_length, self.length_source = _max_length(model, max_length)
        self.head = loss_head(model)

    # What lm-eval reads from a model.

    @property
    def eot_token_id(self) -> int:
        return self.lce_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window are conditioned on: BOS when the tokenizer has one."""
        bos = self.lce_tokenizer.bos_id
        return bos if bos is not None else self.lce_tokenizer.eos_id

    @property
    def max_length(self) -> int | None:
        """The longest input (None: no bound)."""
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self.device_

    @property
    def tokenizer_name(self) -> str:
        hf = getattr(self.lce_tokenizer, "hf", None)
        return getattr(hf, "name_or_path", None) or type(self.lce_tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """lce's tokenisation (no special tokens: ``prefix_token_id`` stands for BOS where lm-eval wants one)."""
        return self.lce_tokenizer.encode(string).tolist()

    def tok_decode(self, tokens) -> str:
        return self.lce_tokenizer.decode(tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        hf = getattr(self.lce_tokenizer, "hf", None)
        check(hf is not None and getattr(hf, "chat_template", None), "apply_chat_template",
              "the model's tokenizer has no chat template")
        return hf.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                      continue_final_message=not add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's chat template (recorded by lm-eval with the results); None when not asked for or absent."""
        hf = getattr(self.lce_tokenizer, "hf", None)
        return getattr(hf, "chat_template", None) if chat_template else None

    # Scoring.

    def score_tokens(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Summed log-probability of ``continuation`` after ``context`` and whether every token is the argmax.

        The model runs on ``context + continuation`` (the last token too, as lce's perplexity scoring does); the
        length checked against ``max_length`` is lm-eval's, the ``len(context + continuation) - 1`` tokens the
        predictions are made from (a rolling window of ``max_length`` predictions).
        """
        ids = context + continuation
        n = len(continuation)
        check(len(context) >= 1 and n >= 1, "loglikelihood", "needs at least one context and one continuation token")
        # lm-eval's count: the tokens the predictions are made from (the last token is only a target).
        self._check_length(len(ids) - 1, "loglikelihood")
        input_ids = torch.tensor([ids], device=self.device_)
        targets = input_ids[0, -n:]
        with torch.inference_mode(), use_backend(self.backend):
            hidden = hidden_states(self.model, input_ids)[0, -n - 1 : -1]  # [n, C]: the rows predicting the targets
            nll = token_nll(self.head, hidden, targets, self.chunk_size)
            greedy = bool((logits_from_hidden(self.model, hidden).argmax(-1) == targets).all())
        return -float(nll.double().sum()), greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for (cache_key, context, continuation) in tqdm(requests, desc="lce loglikelihood", disable=disable_tqdm):
            result = self.score_tokens(list(context), list(continuation))
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, result)
            results.append(result)
        return results

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
        """lm-eval's disjoint rolling windows ``(context, predicted)`` of ``tokens`` for ``max_length`` (one window
        holding every token when there is no bound)."""
        max_seq_len = self._max_length or max(len(tokens), 1)
        windows = lm_utils.get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                     max_seq_len=max_seq_len, context_len=1)
        return [lm_utils.make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (string,) in tqdm([r.args for r in requests], desc="lce loglikelihood_rolling", disable=disable_tqdm):
            total = sum(self.score_tokens(context, predicted)[0]
                        for context, predicted in self.rolling_windows(self.tok_encode(string)))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="lce generate_until", disable=disable_tqdm):
            until, max_gen_toks = self._generation_args(gen_kwargs)
            ids = self.tok_encode(context) or [self.prefix_token_id]
            self._check_length(len(ids) + max_gen_toks, "generate_until",
                               f" ({len(ids)} prompt tokens + max_gen_toks {max_gen_toks})")
            text = self.greedy_until(ids, until, max_gen_toks)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            results.append(text)
        return results

    def greedy_until(self, ids: list[int], until: list[str], max_gen_toks: int) -> str:
        """Greedy continuation of ``ids`` with the KV cache, cut before the first of ``until``; EOS ends it."""
        keyword = cache_keyword(self.model)
        generated: list[int] = []
        text = ""
        with torch.inference_mode(), use_backend(self.backend):
            out = self.model(input_ids=torch.tensor([ids], device=self.device_), use_cache=True, logits_to_keep=1)
            for step in range(max_gen_toks):
                token = int(out.logits[0, -1].argmax())
                if token == self.eot_token_id:
                    break
                generated.append(token)
                text = self.tok_decode(generated)
                if any(stop in text for stop in until):
                    break
                if step + 1 < max_gen_toks:
                    step_ids = torch.tensor([[token]], device=self.device_)
                    out = self.model(input_ids=step_ids, use_cache=True, **{keyword: returned_cache(out)})
        for stop in until:
            text = text.split(stop)[0]
        return text

    def _generation_args(self, gen_kwargs: dict) -> tuple[list[str], int]:
        kwargs = dict(gen_kwargs or {})
        if kwargs.get("do_sample"):
            raise ConfigError("generate_until: do_sample=True is not supported; lce's harness model decodes greedily "
                              "(set do_sample: false in the task's generation_kwargs)")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        eos = self.tok_decode([self.eot_token_id])
        if eos and eos not in until:
            until.append(eos)
        return [u for u in until if u], int(kwargs.get("max_gen_toks", self.max_gen_toks))

    def _check_length(self, length: int, what: str, detail: str = "") -> None:
        if self._max_length is not None and length > self._max_length:
            raise ConfigError(
                f"{what}: an input of {length} tokens{detail} is longer than max_length={self._max_length} "
                f"({self.length_source}); lce does not truncate it: raise the patch's factor or pass "
                "max_length=<tokens> in model_args")


def _with_fields(spec: Any, fields: dict[str, Any]) -> Any:
    if not fields:
        return spec
    from lce.config import to_plain

    spec = to_plain(spec)
    return {**({"name": spec} if isinstance(spec, str) else dict(spec)), **fields}


def _device(device: str | None, check_device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(str(device)) or torch.device(str(device))


def _max_length(model: nn.Module, requested: int | None) -> tuple[int | None, str]:
    """``max_length`` and where it comes from: the request, else the patch's bound, else none."""
    from lce.train.limits import supported_length

    bound, source = supported_length(model)
    if requested is not None:
        if bound is not None and requested > bound:
            warnings.warn(f"max_length={requested} is above the {bound} positions the position encoding supports, "
                          f"{source}", stacklevel=3)
        return requested, "max_length in model_args"
    return bound, source
