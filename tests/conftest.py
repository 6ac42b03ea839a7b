import sys
from pathlib import Path

# Test helpers (direct forms, worker scripts) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
