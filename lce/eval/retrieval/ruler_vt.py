"""RULER's variable tracking, ``vt`` (NVIDIA/RULER ``scripts/data/synthetic/variable_tracking.py``; shared parts in
``lce.eval.retrieval.ruler``): chains of assignments ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ... hidden as
lines of a noise haystack; the question asks for every variable that ends up holding the value::

    <in-context example, answered>

    Memorize and track the chain(s) of variable assignment hidden in the following text.

    <context>
    Question: Find all variables that are assigned the value 12345 in the text above. Answer: According to the
    chain(s) of variable assignment in the text above, 5 variables are assigned the value 12345, they are:

As in RULER: ``num_chains`` chains (the first one is asked) of ``num_hops`` hops, variables of five capital letters
(distinct), values of ``key_digits`` digits; each chain's lines go at random sorted positions among the haystack's
noise lines (lines ``VAR X = VAR Y `` keep RULER's trailing space). The in-context example is RULER's: the same task
with three-letter variables and the value 12345 in a noise haystack sized to 500 tokens (of this tokenizer, as RULER
sizes it, falling back to 5 lines when even those do not fit), answered; once per (seed, tokenizer), its variables
and value then redrawn in each trial. The haystack unit is one noise line. No depth: the chains are spread at random.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

from lce.config import check
from lce.eval.retrieval.ruler import NOISE, VT_PREFIX, VT_TEMPLATE, Haystack, RulerTask, Sample
from lce.eval.retrieval.tasks import RETRIEVALS

ICL_TOKENS = 500  # RULER's max_seq_length of the in-context example
ICL_VALUE = "12345"


@RETRIEVALS.register("ruler_vt")
@dataclass(frozen=True)
class RulerVt(RulerTask):
    """RULER's variable tracking (see the module docstring).

    Attributes:
        num_chains: chains in the haystack; the first one's value is asked.
        num_hops: assignments after the first in each chain (the answer has ``num_hops + 1`` variables).
        add_fewshot: put RULER's answered in-context example first.
    """

    name: str = "ruler_vt"
    depths: list[float] = field(default_factory=list)
    key_digits: int = 5
    max_new_tokens: int = 30
    num_chains: int = 1
    num_hops: int = 4
    add_fewshot: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_chains", "num_hops"):
            check(getattr(self, name) >= 1, f"retrieval.{name}", f"must be >= 1, got {getattr(self, name)}")

    def min_units(self, length: int) -> int:
        return self.num_hops + 1  # the first chain's lines go at distinct positions among the noise lines

    def _chains(self, rng: random.Random, letters: int, hops: int, value: str | None) -> tuple[list, list]:
        """RULER's ``generate_chains``: distinct variables, and each chain's lines."""
        count = (hops + 1) * self.num_chains
        names: list[str] = []
        while len(names) < count:
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if name not in names and name != "VAR":  # RULER's redraw of the example's names would rewrite "VAR"
                names.append(name)
        variables = [names[i: i + hops + 1] for i in range(0, count, hops + 1)]
        chains = []
        for chain_vars in variables:
            first = value or str(rng.randint(10 ** (self.key_digits - 1), 10**self.key_digits - 1))
            chains.append([f"VAR {chain_vars[0]} = {first}",
                           *(f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]} " for j in range(hops))])
        return variables, chains

    def _text(self, rng: random.Random, n: int, letters: int, hops: int, value: str | None) -> tuple[str, str, list]:
        """The task text without and with its answer prefix' ``(body, lead, answer variables)``; RULER's
        ``generate_input_output``."""
        variables, chains = self._chains(rng, letters, hops, value)
        lines = [NOISE] * n
        for chain in chains:
            positions = sorted(rng.sample(range(len(lines)), len(chain)))
            for j, (position, line) in enumerate(zip(positions, chain)):
                lines.insert(position + j, line)
        context = "\n".join(lines).replace(". \n", ".\n")
        query = chains[0][0].split("=")[-1].strip()
        body = VT_TEMPLATE.format(context=context, query=query)
        return body, VT_PREFIX.format(num_v=hops + 1, query=query), variables[0]

    def _example(self, haystack: Haystack) -> str:
        """The answered in-context example, sized to ``ICL_TOKENS`` by bisection on its noise lines (RULER's search
        from 5 lines; 5 when none fits)."""
        key = ("ruler_vt", self.seed, self.num_chains, self.num_hops, self.key_digits)
        if key not in haystack.cache:
            hops = min(10, self.num_hops)

            def example(n: int) -> str:
                body, lead, answer = self._text(random.Random(f"ruler_vt:icl:{self.seed}"), n, 3, hops, ICL_VALUE)
                return body + lead + " " + " ".join(answer) + "\n"

            low, high = 5, 6
            if haystack.count(example(low)) <= ICL_TOKENS:
                while haystack.count(example(high)) <= ICL_TOKENS:
                    low, high = high, high * 2
                while high - low > 1:
                    mid = (low + high) // 2
                    low, high = (mid, high) if haystack.count(example(mid)) <= ICL_TOKENS else (low, mid)
            haystack.cache[key] = example(low)
        return haystack.cache[key]

    def sample(self, rng: random.Random, n: int, depth: float | None, length: int, haystack: Haystack) -> Sample:
        body, lead, answer = self._text(rng, n, 5, self.num_hops, None)
        context = body[body.index("\n\n") + 2: body.rindex("\nQuestion: ")]
        if self.add_fewshot:
            example = self._example(haystack)
            # RULER's randomize_icl: the answer's variables and the value redrawn, every occurrence replaced.
            for name in example.strip().split()[-min(10, self.num_hops) - 1:]:
                example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
            example = example.replace(ICL_VALUE, str(rng.randint(10000, 99998)))
            body = example + "\n" + body
        return Sample(body, lead, answer, None, context, tuple(answer))
