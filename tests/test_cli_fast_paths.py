"""The command line's fast paths: ``--help`` and argument errors without torch, a Hub id without a network
refused within seconds with a hint (instead of a minute of retries and a bare ``OSError``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from optimum_mwanda.cli import EXIT_FAILURE, main
from optimum_mwanda.hub import connectivity
from optimum_mwanda.hub.connectivity import HubUnreachableError, check_hub_model_reachable

_HEAVY = ("torch", "transformers", "huggingface_hub")

_PROBE = """
import contextlib, io, json, sys
from optimum_mwanda.cli import main
codes = []
for argv in ({argvs}):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as stop:
            codes.append(stop.code)
print(json.dumps({{"codes": codes, "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


def _probe(*argvs: list[str]) -> dict:
    code = _PROBE.format(argvs=", ".join(repr(a) for a in argvs) + ",", heavy=_HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_and_flag_errors_do_not_import_torch():
    result = _probe(
        ["--help"],
        ["prune", "--help"],
        ["eval", "--help"],
        ["sweep", "--help"],
        ["card", "--help"],
        ["prune", "--sparsity", "2"],
        ["prune", "--no-such-flag"],
    )
    assert result["codes"] == [0, 0, 0, 0, 0, 2, 2]
    assert result["heavy"] == []


def test_import_optimum_mwanda_is_lazy_and_complete():
    code = (
        "import sys, optimum_mwanda as m; heavy = 'torch' in sys.modules; "
        "names = [getattr(m, n) for n in m.__all__]; print(heavy, 'torch' in sys.modules, len(names))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy_at_import, heavy_after_use, count = out.stdout.split()
    assert (heavy_at_import, heavy_after_use) == ("False", "True")
    import optimum_mwanda

    assert int(count) == len(optimum_mwanda.__all__) and "Pruner" in dir(optimum_mwanda)


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The Hub endpoint is a closed local port: the connection is refused at once."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_unreachable_hub_is_named_with_a_hint(unreachable_hub):
    with pytest.raises(HubUnreachableError, match=r"cannot reach http://127\.0\.0\.1:9 .*local model folder"):
        check_hub_model_reachable("someone/not-cached-model")


def test_cached_model_hint_is_offline_mode(unreachable_hub, monkeypatch):
    monkeypatch.setattr(connectivity, "_is_cached", lambda repo_id, revision: True)
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE=1"):
        check_hub_model_reachable("someone/cached-model")


def test_offline_mode_without_cache_is_refused(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        HubUnreachableError, match="HF_HUB_OFFLINE is set and 'someone/x' is not in the local"
    ):
        check_hub_model_reachable("someone/x")
    monkeypatch.setattr(connectivity, "_is_cached", lambda repo_id, revision: True)
    check_hub_model_reachable("someone/x")  # cached: transformers loads it offline


def test_reachable_endpoint_passes(monkeypatch):
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        assert connectivity.unreachable_reason(f"http://127.0.0.1:{server.getsockname()[1]}") is None
    finally:
        server.close()


def test_cli_reports_an_unreachable_hub_before_loading(unreachable_hub, capsys):
    assert main(["eval", "someone/not-cached-model"]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "HubUnreachableError: cannot reach http://127.0.0.1:9" in err and "local model folder" in err
