"""What the tests share: the committed tiny checkpoints and images, and the `blip` program whose
outputs the package must reproduce (target/release/blip, built by the Rust tests)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "crates/blip/tests/fixtures"
IMAGES = [FIXTURES / "images-model" / name for name in ["chelsea.png", "astronaut.png", "rocket.jpg"]]
BLIP = Path(os.environ.get("BLIP_BIN", REPO / "target/release/blip"))


def model(name: str) -> str:
    return str(FIXTURES / "models" / name)


def cli(*args: str) -> list:
    """The JSONL records `blip` prints for `args`."""
    out = subprocess.run([str(BLIP), *args, "--format", "jsonl"], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="session")
def images():
    return [str(p) for p in IMAGES]
