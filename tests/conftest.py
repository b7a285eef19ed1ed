import os
import sys
from pathlib import Path

# Tests import the repo's packages (models, data, configs) and their helpers (na_reference).
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# Without an NVIDIA GPU, the 'triton' NA backend's tests run its kernels in Triton's CPU interpreter.
# Triton picks interpreted or compiled when it is first imported (torch imports it), so this must
# come before anything imports torch; it touches nothing else (only Triton kernels read it).
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")
