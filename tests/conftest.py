import sys
from pathlib import Path

# Tests import the repo's packages (models, data, configs) and their helpers (na_reference).
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
