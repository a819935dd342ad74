"""Each ATEN_CPU_CAPABILITY gets its own Inductor cache directory (steadylm.kernels._compile).

Inductor's FX-graph cache key ignores the vector ISA picked from ATEN_CPU_CAPABILITY (torch 2.13):
avx2 code reused by an avx512 process overran its buffers in the fused BHyT backward ("double free
or corruption"), and avx512 code fails to build under ``default``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from steadylm.kernels import _compile


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_a_capability_gets_its_own_cache_dir(monkeypatch: pytest.MonkeyPatch, capability: str) -> None:
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    _compile._separate_inductor_cache_per_cpu_capability()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir() + "_" + capability


def test_an_explicit_cache_dir_wins(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    _compile._separate_inductor_cache_per_cpu_capability()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)


def test_no_capability_keeps_torchs_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    _compile._separate_inductor_cache_per_cpu_capability()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_importing_steadylm_sets_it_before_inductor_reads_it() -> None:
    """In a fresh process, the directory Inductor actually uses after ``import steadylm``."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["ATEN_CPU_CAPABILITY"] = "avx2"
    code = ("import steadylm.models\n"
            "from torch._inductor.runtime.cache_dir_utils import cache_dir\n"
            "print(cache_dir())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == default_cache_dir() + "_avx2"
