"""On PYTHONPATH only in the environment `truth_model.env()` makes: every Python process started with it
(the `infdit` command, torchrun's launcher and ranks) runs the truth denoiser (tests/truth_model.py)."""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))

import truth_model

truth_model.install()
