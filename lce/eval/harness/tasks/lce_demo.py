"""The data of lce's bundled demo tasks: ``lce_demo.jsonl`` beside this file, read without any download."""

import json
from pathlib import Path

DATA = Path(__file__).with_name("lce_demo.jsonl")


def load(kind: str = "ppl", **kwargs):
    """The test split of the demo task ``kind`` (``ppl``, ``choice`` or ``gen``); lm-eval passes the task's
    ``dataset_kwargs`` and ``--metadata`` as keyword arguments."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "kind"}
                                                for r in rows if r["kind"] == kind])}
