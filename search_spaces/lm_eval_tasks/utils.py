"""Local data for the evoray skill tasks: the ``.jsonl`` files beside this file.

lm-eval resolves ``dataset_kwargs.data_files`` against the working directory; loading through
this function instead finds ``data/<skill>/`` wherever the folder is, so ``--include_path``
works from any directory. Regenerate the files with ``python -m evoray.tasks.skills DIR``.
"""

from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "data"


def load_skill(skill: str, **_: object) -> datasets.DatasetDict:
    """The skill's ``validation`` (dev) and ``test`` splits."""
    files = {
        "validation": str(DATA / skill / "dev.jsonl"),
        "test": str(DATA / skill / "test.jsonl"),
    }
    return datasets.load_dataset("json", data_files=files)
