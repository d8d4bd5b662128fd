"""Puts this directory's helpers (hf_decoders) on sys.path for the tests of the Hugging Face targets."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
