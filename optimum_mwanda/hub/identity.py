"""Names on the Hub: the one place that validates repo ids and decides whether a model reference is a Hub id.

``huggingface_hub.utils.validate_repo_id`` does the checking (offline); this module only turns its answer
into the package's errors and choices, so the card, the push, the CLI and the pruner agree.
"""

from __future__ import annotations

import os


def validate_repo_id(repo_id: object, what: str = "repo_id") -> str:
    """Return ``repo_id`` (``name`` or ``namespace/name``) when it is a valid Hub id; ``ValueError`` naming
    ``what`` otherwise (``TypeError`` for a non-string)."""
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    if not isinstance(repo_id, str):
        raise TypeError(f"{what} must be a string, got {type(repo_id).__name__}")
    try:
        hub_validate(repo_id)
    except HFValidationError as err:
        raise ValueError(f"invalid {what} {repo_id!r} (a Hub id is namespace/name): {err}") from None
    return repo_id


def as_hub_id(reference: object) -> str | None:
    """``reference`` when it is a valid Hub repo id, else ``None`` (never raises)."""
    try:
        return validate_repo_id(reference)
    except (TypeError, ValueError):
        return None


def hub_ids(references: list[str]) -> list[str]:
    """The entries that are valid Hub repo ids, deduplicated in order."""
    return list(dict.fromkeys(ref for ref in references if as_hub_id(ref) is not None))


def base_model_id(reference: str | None) -> str | None:
    """The Hub id a model was loaded from, or ``None`` when ``reference`` is a local folder (which names no
    base model on the Hub) or no valid id."""
    if not reference or os.path.exists(reference):
        return None
    return as_hub_id(reference)
