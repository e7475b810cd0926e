"""Run from the checkout's root, ``import kernels`` must reach the Hub's installed package, not our ``kernels/`` folder.

transformers >= 5.25 imports the Hub's ``kernels`` distribution from its MoE integration
(``integrations/_hub_kernels.py`` says why ours shadowed it). A stand-in distribution on a
later ``sys.path`` entry plays the installed one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import sys
sys.path.insert(1, sys.argv[1])  # after the root (''), before site-packages: ahead of an installed one
from blocksparse_moe.integrations._hub_kernels import unshadow_hub_kernels
unshadow_hub_kernels()
import kernels
print(getattr(kernels, "HUB_STAND_IN", "ours"))
"""


def _probe(extra: Path) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, str(extra)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_the_installed_distribution_wins_over_our_folder(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("HUB_STAND_IN = 'hub'\n")
    assert _probe(tmp_path) == "hub"


def test_our_folder_loaded_under_the_name_is_replaced(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("HUB_STAND_IN = 'hub'\n")
    probe = PROBE.replace("unshadow_hub_kernels()", "import kernels as early; assert not hasattr(early, 'HUB_STAND_IN')"
                          "\nunshadow_hub_kernels()")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "hub"
