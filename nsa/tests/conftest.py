"""Shared fixtures for the nsa suites: a fresh, reproducible seed per test case, small random
configurations, random q/k/v, and the settings/workspace hygiene every test relies on.

Markers are registered in pyproject.toml; none are registered here.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch

import nsa

# The settings module (``override``, ``from_env``, the cached ``_current``).
nsa_settings = nsa.flags

# Every CPU tensor here is tiny: intra-op threads only add overhead, and when another process holds
# a core (CI neighbours, a benchmark) spinning OpenMP workers make small ops 30x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """A different seed for every test case (derived from its node id, so a failure reproduces)."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    random.seed(value)
    return value


@pytest.fixture(autouse=True)
def _clean_state():
    """Each test starts with default settings and empty workspaces, and leaves them so."""
    before = nsa_settings._current
    nsa.reset_workspaces()
    yield
    nsa_settings._current = before
    nsa.reset_workspaces()


@pytest.fixture
def override():
    """``with override(use_sel_pack=False): ...`` (nsa.override_settings)."""
    return nsa_settings.override


@pytest.fixture
def from_env():
    return nsa_settings.from_env


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A torch generator seeded for this case (for inputs drawn independently of module init)."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def cuda():
    """The CUDA device; skips the test where there is none."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: torch.cuda.is_available() is False on this machine")
    return torch.device("cuda")


def tiny_cfg(**overrides) -> nsa.NSAConfig:
    """A small layer whose branches all do something at T of a few dozen tokens."""
    base = {"dim": 24, "groups": 2, "heads_per_group": 2, "d_k": 8, "d_v": 6, "block_len": 8, "block_stride": 4,
            "sel_block_len": 8, "n_sel": 3, "window": 8}
    base.update(overrides)
    return nsa.NSAConfig(**base)


@pytest.fixture
def make_cfg():
    return tiny_cfg


def rand_qkv(B, T, S, G, h, d_k, d_v, dtype=torch.float32, device="cpu", generator=None, scale=1.0):
    """``q [B, T, G*h, d_k]``, ``k [B, S, G, d_k]``, ``v [B, S, G, d_v]`` from a normal distribution."""
    def r(*shape):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    return r(B, T, G * h, d_k), r(B, S, G, d_k), r(B, S, G, d_v)


@pytest.fixture
def qkv():
    return rand_qkv


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (relative to the reference's scale)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
