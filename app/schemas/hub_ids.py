"""Hugging Face hub repository ids (models and datasets): the hub's own rules, in one regular expression.

`name` or `namespace/name`; each part 1-96 characters of letters, digits, '.', '_' and '-', neither starting
nor ending with '-' or '.'; no '--' or '..' anywhere; not ending in '.git'. Matched whole (`fullmatch`), so a
trailing newline is refused too.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

_PART = r"(?![-.])[A-Za-z0-9._-]{1,96}(?<![-.])"
HUB_REPO_ID = re.compile(rf"(?:{_PART}/)?{_PART}")
MAX_HUB_REPO_ID_LENGTH = 96 * 2 + 1


def is_hub_repo_id(text: str) -> bool:
    return (
        HUB_REPO_ID.fullmatch(text) is not None
        and "--" not in text
        and ".." not in text
        and not text.endswith(".git")
    )


def check_hub_repo_id(text: str) -> str:
    """`text` if it is a hub repository id, else ValueError saying what one looks like."""
    if not is_hub_repo_id(text):
        raise ValueError(
            f"{text!r} is not a Hugging Face hub id: expected 'name' or 'namespace/name' (letters, digits, "
            "'.', '_', '-'; at most 96 each; no '--' or '..'; not starting or ending with '-' or '.')"
        )
    return text


HubRepoId = Annotated[str, AfterValidator(check_hub_repo_id)]
