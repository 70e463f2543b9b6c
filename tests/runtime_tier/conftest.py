"""The runtime tier: packages built without torch (build_packages.py, through the `tier_packages`
fixture of tests/conftest.py), used as a runtime-only install uses them. Nothing here or in
tests/conftest.py imports torch, transformers or onnx: .ci/run runs this directory in a venv that has
none of them (`pip install -e .` and pytest), with $NEOEDGE_RUNTIME_TIER_PACKAGES pointing at
packages the test venv built."""

from __future__ import annotations

import pytest

from neoedge import Model, SessionSettings


@pytest.fixture(scope="session")
def tier_models(tier_packages):
    cache: dict[str, Model] = {}

    def load(name: str) -> Model:
        if name not in cache:
            cache[name] = Model(tier_packages[name], settings=SessionSettings(intra_threads=1))
        return cache[name]

    return load


@pytest.fixture(scope="session", params=["gqa", "plain", "int4", "plain-h12"])
def tier_model(request, tier_models) -> Model:
    """Each of the tier's packages in turn."""
    return tier_models(request.param)
