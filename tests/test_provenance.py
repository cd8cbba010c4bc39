"""sclref.provenance: what a run records to be reproduced, what differs on another set-up, and the machine."""

import json

import numpy as np
import pytest
import threadpoolctl

from sclref import provenance


def test_provenance_is_plain_json_and_names_numpys_blas():
    record = provenance.reproducibility()
    assert json.loads(json.dumps(record)) == record
    assert record["blas_threads"] == 1
    assert record["numpy"] == np.__version__
    assert "jit_disabled" not in record and "numba_threads" not in record  # they change no bit
    loaded = {(lib["internal_api"], lib["version"]) for lib in threadpoolctl.threadpool_info()
              if lib["user_api"] == "blas"}
    assert record["blas"] and {(lib["internal_api"], lib["version"]) for lib in record["blas"]} <= loaded


def _recorded(**changes):
    """This process's provenance after a JSON round trip, with `changes` applied."""
    record = json.loads(json.dumps(provenance.reproducibility()))
    record.update(changes)
    return record


def test_an_unchanged_record_can_be_resumed():
    assert provenance.resume_differences(_recorded()) == []


def test_thread_counts_and_the_jit_are_not_differences():
    record = _recorded(blas_threads=8, numba_threads=64, jit_disabled=True)
    assert provenance.resume_differences(record) == []


def test_another_blas_architecture_is_a_difference():
    blas = [{**lib, "architecture": "SkylakeX"} for lib in provenance.reproducibility()["blas"]]
    if blas == provenance.reproducibility()["blas"]:
        blas = [{**lib, "architecture": "Zen"} for lib in blas]
    (line,) = provenance.resume_differences(_recorded(blas=blas))
    assert line.startswith("BLAS:") and blas[0]["architecture"] in line


def test_another_blas_library_or_version_is_a_difference():
    mkl = [{"internal_api": "mkl", "version": "2024.0", "architecture": None}]
    (line,) = provenance.resume_differences(_recorded(blas=mkl))
    assert "mkl 2024.0" in line
    older = [{**lib, "version": "0.0.1"} for lib in provenance.reproducibility()["blas"]]
    assert len(provenance.resume_differences(_recorded(blas=older))) == 1


def test_other_versions_and_missing_fields_are_differences():
    found = provenance.resume_differences(_recorded(numpy="1.0.0", numba="0.1.0"))
    assert len(found) == 2 and any("NumPy version" in f for f in found) and any("numba" in f for f in found)
    record = _recorded()
    del record["blas"]
    assert provenance.resume_differences(record) == ["BLAS: not recorded"]
    assert provenance.resume_differences([]) != []


def test_other_simd_extensions_are_a_difference_when_both_sides_recorded_them():
    simd = provenance.reproducibility()["numpy_simd"]
    if simd is None:
        pytest.skip("this NumPy does not report its SIMD extensions")
    assert len(provenance.resume_differences(_recorded(numpy_simd=simd + ["AVX512_SPR"]))) == 1
    assert provenance.resume_differences(_recorded(numpy_simd=None)) == []


def test_machine_holds_versions_threads_and_the_reproducibility_record():
    info = provenance.machine()
    assert json.loads(json.dumps(info)) == info
    assert info["numpy"] == np.__version__ and info["cpus"] >= 1 and isinstance(info["jit_disabled"], bool)
    assert info["reproducibility"] == provenance.reproducibility()
    assert info["git_commit"] is None or len(info["git_commit"]) == 40
