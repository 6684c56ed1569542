"""Push a pruned model to the Hugging Face Hub in one commit, with retries on transient failures.

Everything (weights, config, tokenizer, report, card, plot) is first written to a temporary folder with
:func:`save_pruned_model`, so bad input fails before any network call; then the repo is created if needed
and all files go up in a single ``create_commit``. A commit is atomic on the Hub: a failed push leaves the
repo as it was. A retried commit whose first attempt did land is a no-op (the Hub reports every file as
unchanged), so retries never duplicate work.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..distributed import main_process_only
from ..report import PruningReport
from .atomic import MANIFEST_NAME
from .identity import validate_repo_id
from .serialization import save_pruned_model

logger = logging.getLogger(__name__)
T = TypeVar("T")


class HubPushError(RuntimeError):
    """A push to the Hub failed (after retries, for transient failures)."""


class HubAuthenticationError(HubPushError):
    """No token, or the Hub rejected it (HTTP 401)."""


class HubPermissionError(HubPushError):
    """The token is valid but may not write to this repo or namespace (HTTP 403)."""


def _transient_exception_types() -> tuple[type[BaseException], ...]:
    """Connection-level failures worth retrying, for whichever HTTP client huggingface_hub uses."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "ConnectionError"),
    ):
        try:
            types.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(types)


def _status_code(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def is_transient(error: BaseException) -> bool:
    """5xx, 408 and 429 answers and dropped/reset/timed-out connections (also when wrapped by the client)."""
    transient_types = _transient_exception_types()
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        status = _status_code(current)
        if status is not None and (status >= 500 or status in (408, 429)):
            return True
        if isinstance(current, transient_types):
            return True
        current = current.__cause__ or current.__context__
    return False


def _translate(error: BaseException, repo_id: str) -> BaseException:
    """A clear error for authentication and permission failures; other errors unchanged."""
    status = _status_code(error)
    if status == 401:
        return HubAuthenticationError(
            f"the Hub rejected the token while pushing to {repo_id!r} (HTTP 401): check that it is valid and has "
            "write access (`hf auth login`, or pass token=)"
        )
    if status == 403:
        return HubPermissionError(
            f"the token may not write to {repo_id!r} (HTTP 403): use a token with write access to that namespace "
            "or push to your own namespace"
        )
    return error


def with_retries(
    action: Callable[[], T], *, what: str, repo_id: str, max_retries: int, retry_delay: float
) -> T:
    """Run ``action``; on a transient failure retry up to ``max_retries`` times with exponential backoff."""
    attempt = 0
    while True:
        try:
            return action()
        except Exception as error:  # classified below; anything else propagates unchanged
            if not is_transient(error) or attempt >= max_retries:
                translated = _translate(error, repo_id)
                if translated is error:
                    if is_transient(error):
                        raise HubPushError(
                            f"{what} for {repo_id!r} still failing after {attempt + 1} attempts: {error}"
                        ) from error
                    raise
                raise translated from error
            delay = retry_delay * 2**attempt
            logger.warning("%s for %r failed (%s); retrying in %.2fs", what, repo_id, error, delay)
            time.sleep(delay)
            attempt += 1


def resolve_token(token: str | bool | None) -> str:
    """The Hub token to write with: ``token``, else ``HF_TOKEN`` or the cached login (the one place that
    decides; the CLI and :func:`push_pruned_model` both call it)."""
    from huggingface_hub import get_token

    if token is False:
        raise HubAuthenticationError("pushing needs a Hugging Face token; token=False disables it")
    if token is None or token is True:
        token = get_token()
    if not token:
        raise HubAuthenticationError(
            "no Hugging Face token found: pass token=, set HF_TOKEN, or run `hf auth login` before pushing"
        )
    if not isinstance(token, str):
        raise TypeError(f"token must be a string, got {type(token).__name__}")
    return token


def check_push_access(repo_id: str, token: str, *, max_retries: int = 2, retry_delay: float = 1.0) -> str:
    """Ask the Hub, before any work, whether ``token`` may push to ``repo_id``; return the full repo id.

    One ``whoami`` request: a token the Hub rejects raises :class:`HubAuthenticationError`; a read-only token,
    or a namespace that is neither the token's user nor one of its organisations, raises
    :class:`HubPermissionError`. Fine-grained tokens are let through (their per-repo rights are not listed
    there; the push itself reports a refusal). Transient failures are retried, then raise
    :class:`HubPushError`.
    """
    validate_repo_id(repo_id)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    account = with_retries(
        lambda: api.whoami(token=token),
        what="checking the token",
        repo_id=repo_id,
        max_retries=max_retries,
        retry_delay=retry_delay,
    )
    user = str(account.get("name", ""))
    namespace, _, name = repo_id.rpartition("/")
    namespace = namespace or user
    role = ((account.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubPermissionError(
            f"the token of {user!r} is read-only: pushing to '{namespace}/{name}' needs a token with write "
            "access (https://huggingface.co/settings/tokens)"
        )
    allowed = [user] + [str(org.get("name")) for org in account.get("orgs") or [] if isinstance(org, dict)]
    if namespace not in allowed:
        raise HubPermissionError(
            f"the token of {user!r} may not create or write repos in the namespace {namespace!r} (its "
            f"namespaces: {', '.join(allowed)}): push to one of them"
        )
    return f"{namespace}/{name}"


@main_process_only  # data-parallel runs: rank 0 writes, the others wait for it
def push_pruned_model(
    model,
    repo_id: str,
    report: PruningReport,
    tokenizer=None,
    eval_results: dict[str, dict[str, float]] | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    max_retries: int = 5,
    compressed: bool = False,
    *,
    base_model: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    eval_dataset: str | None = None,
    retry_delay: float = 1.0,
) -> Any:
    """Upload a pruned model, its tokenizer, report, model card and sparsity plot to ``repo_id`` in one commit.

    Args:
        model, report, tokenizer, eval_results, compressed: as in :func:`save_pruned_model`.
        repo_id: ``namespace/name`` (or ``name`` for the token's own namespace); validated before any request.
        private: create the repo as private (an existing repo keeps its visibility).
        token: a write token; defaults to the logged-in one (``HF_TOKEN`` or the cached login).
        commit_message: defaults to a summary of the run.
        max_retries: retries for transient failures (5xx, 408/429, dropped connections) of each step.
        base_model, license, datasets, eval_dataset: card metadata, see :func:`create_model_card`.
        retry_delay: first backoff delay in seconds (doubles on each retry).

    Returns:
        The ``huggingface_hub.CommitInfo`` of the commit (``.oid``, ``.commit_url``).

    Raises:
        ValueError: invalid ``repo_id``, language code or other input (before any network call).
        HubAuthenticationError: no token, or the Hub answered 401.
        HubPermissionError: the Hub answered 403.
        HubPushError: a transient failure persisted past ``max_retries``.
    """
    validate_repo_id(repo_id)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}")
    if retry_delay < 0:
        raise ValueError(f"retry_delay must be >= 0, got {retry_delay}")
    token = resolve_token(token)
    if commit_message is None:
        commit_message = f"Upload {report.method} pruned model ({100 * report.achieved_sparsity:.1f}% sparse) with optimum-mwanda"

    from huggingface_hub import CommitOperationAdd, HfApi

    with tempfile.TemporaryDirectory(prefix="optimum-mwanda-push-") as tmp:
        folder = save_pruned_model(
            model,
            Path(tmp) / "model",
            report,
            tokenizer=tokenizer,
            compressed=compressed,
            eval_results=eval_results,
            base_model=base_model,
            model_id=repo_id,
            license=license,
            datasets=datasets,
            eval_dataset=eval_dataset,
            durable=False,  # a temporary folder, uploaded and deleted: nothing to keep across a power loss
        )
        # The manifest describes a local folder (which files optimum-mwanda wrote there), not the repo.
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
        api = HfApi(token=token)
        retry = {"repo_id": repo_id, "max_retries": max_retries, "retry_delay": retry_delay}
        repo_url = with_retries(
            lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
            what="creating the repo",
            **retry,
        )
        target = getattr(repo_url, "repo_id", None) or repo_id

        def commit():
            # Fresh operations on every attempt: huggingface_hub refuses to reuse committed ones.
            operations = [
                CommitOperationAdd(
                    path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=os.fspath(p)
                )
                for p in files
            ]
            return api.create_commit(
                target, operations=operations, commit_message=commit_message, repo_type="model"
            )

        return with_retries(commit, what="uploading the commit", **retry)
