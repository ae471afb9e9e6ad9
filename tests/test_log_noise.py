"""Third-party notices that say nothing actionable never reach the user's terminal (issue #28)."""

import subprocess
import sys

from conftest import ROOT


def test_offline_publisher_trust_notice_silenced_other_warnings_kept():
    code = ("import logging, peftkit.log\n"
            "lg = logging.getLogger('kernels._internals.hf_hub')\n"
            "lg.warning(\"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' \"\n"
            "           'because Hugging Face Hub is in offline mode.')\n"
            "lg.warning('some other kernels warning')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip().splitlines() == ["some other kernels warning"]
