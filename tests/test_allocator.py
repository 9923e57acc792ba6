import json
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from peft_any2point import allocator, training
from peft_any2point.allocator import keep_freed_memory


GLIBC = platform.libc_ver()[0] == "glibc"

# In a fresh process (the setting cannot be undone): minor page faults of creating and freeing a 64 MiB tensor,
# above glibc's 32 MiB ceiling past which its default always maps fresh memory, under the default and once kept
# (four tensors one after the other).
FAULTS_SCRIPT = """
import json, resource, torch
from peft_any2point.allocator import keep_freed_memory

def faults(nbytes=64 * 2**20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(nbytes // 4)  # every page written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = [faults(), faults()]
took = keep_freed_memory()
kept = [faults() for _ in range(4)]
print(json.dumps({"default": default, "took": took, "kept": kept, "pages": 64 * 2**20 // resource.getpagesize()}))
"""


def transparent_huge_pages_always() -> bool:
    settings = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return settings.exists() and "[always]" in settings.read_text()


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory acts on glibc only")
@pytest.mark.skipif(transparent_huge_pages_always(), reason="huge pages hide the default's 4 KiB page faults")
def test_kept_memory_is_reused_without_page_faults():
    root = Path(__file__).parents[1]
    run = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, check=True, cwd=root)
    measured = json.loads(run.stdout)
    assert measured["took"] is True
    pages = measured["pages"]
    assert min(measured["default"]) > pages // 2  # the default maps, and faults in, every large tensor afresh
    # Kept: later tensors reuse freed memory. Where the heap cannot grow in place, glibc extends it elsewhere and
    # the second tensor may still need new pages (1 run in 8 here); from the third on, memory is reused.
    assert max(measured["kept"][2:]) < pages // 100


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *args: pytest.fail("mallopt called without glibc"))
    assert keep_freed_memory() is False


@pytest.mark.parametrize(("choice", "calls"), [("auto", 1), ("yes", 1), ("no", 0)])
def test_create_accelerator_keeps_memory_on_the_cpu(monkeypatch, choice, calls):
    if torch.accelerator.is_available():
        pytest.skip("auto keeps freed memory only on the CPU")
    seen = []
    monkeypatch.setattr(training, "keep_freed_memory", lambda: seen.append(choice) or True)
    training.create_accelerator(keep_memory=choice)
    assert len(seen) == calls


def test_create_accelerator_warns_without_glibc(monkeypatch):
    monkeypatch.setattr(training, "keep_freed_memory", lambda: False)
    with pytest.warns(UserWarning, match="keep_freed_memory needs glibc"):
        training.create_accelerator(keep_memory="yes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        training.create_accelerator(keep_memory="no")
