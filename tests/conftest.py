"""Test-session setup shared by every test module.

The Hugging Face Hub environment must be fixed before anything imports huggingface_hub (it reads it at
import), and conftest.py is imported before any test module. Hub traffic goes to a local fake Hub
(tests/hub_server.py) whose port is reserved here; its socket only listens while the ``hub`` fixture is in
use, so any other Hub access fails fast with "connection refused" instead of reaching the network.
"""

import atexit
import os
import shutil
import socket
import tempfile

import pytest

_HUB_SOCKET = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
_HUB_SOCKET.bind(("127.0.0.1", 0))
HUB_ENDPOINT = f"http://127.0.0.1:{_HUB_SOCKET.getsockname()[1]}"
_HF_HOME = tempfile.mkdtemp(prefix="optimum-mwanda-tests-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, True)

os.environ["HF_ENDPOINT"] = HUB_ENDPOINT
os.environ["HF_HUB_DISABLE_XET"] = "1"  # the fake Hub speaks the plain LFS protocol only
os.environ["HF_HOME"] = _HF_HOME  # an empty cache and no stored login: tests never see a real token
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.pop(_name, None)

# The tests run tiny models whose ops are too small to gain from intra-op threads; one thread avoids
# OpenMP overhead (and spinning when the machine is busy). The real-model benchmarks set their own.
import torch  # noqa: E402

torch.set_num_threads(1)

WRITE_TOKEN = "hf_test_write_token"
READ_TOKEN = "hf_test_read_token"


@pytest.fixture(scope="session")
def _hub_server():
    from hub_server import FakeHub
    from huggingface_hub import constants

    if constants.ENDPOINT != HUB_ENDPOINT:
        pytest.fail("huggingface_hub was imported before tests/conftest.py set HF_ENDPOINT")
    server = FakeHub(sock=_HUB_SOCKET).start()
    yield server
    server.stop()


@pytest.fixture
def hub(_hub_server):
    """The fake Hub, emptied, with a write token for user ``alice`` (member of ``mwanda-org``) and a
    read-only token for ``bob``."""
    _hub_server.reset()
    _hub_server.add_token(WRITE_TOKEN, "alice", write=True, orgs=("mwanda-org",))
    _hub_server.add_token(READ_TOKEN, "bob", write=False)
    yield _hub_server
    _hub_server.reset()
