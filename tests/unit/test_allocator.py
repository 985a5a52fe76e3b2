"""`keep_freed_memory`: with glibc's default thresholds a CPU training step faults its memory
back in page by page on every step; with the fixed thresholds it reuses what it freed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trainer.allocator import keep_freed_memory

# A plain PyTorch loop in a fresh process (malloc's settings are per process): minor page faults
# per step over 20 steps after 10 of warm-up.
STEPS = """
import resource, sys, torch
from trainer.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(
    torch.nn.Flatten(), torch.nn.Linear(1024, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
)
optimizer = torch.optim.AdamW(model.parameters())
data = torch.randn(2048, 1, 32, 32)

def step():
    inputs = data[torch.randint(0, 2048, (256,))]
    loss = torch.nn.functional.cross_entropy(model(inputs), torch.randint(0, 10, (256,)))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def faults_per_step(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True
    )
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_a_training_step_reuses_freed_memory_instead_of_faulting_it_back_in():
    default, kept = faults_per_step("default"), faults_per_step("keep")
    # The default faults hundreds of pages per step (~700 here); kept, a step reuses what the
    # last one freed (what remains is the odd growth of Python's own heaps: 0-13 per step).
    assert default > 100 and kept < default / 20, (default, kept)


def test_it_reports_whether_the_c_library_took_the_settings():
    assert keep_freed_memory() is sys.platform.startswith("linux")
