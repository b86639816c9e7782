"""benchmarks/anchor.py without the authors' code: it says how to get it and exits non-zero, and it
never downloads anything itself."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "anchor.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_without_reference_dir_explains_and_fails():
    p = _run()
    assert p.returncode != 0
    assert "--reference-dir is required" in p.stderr
    assert "git clone" in p.stderr and "FaceExpDisentanglement" in p.stderr
    assert "RESULT" not in p.stdout


def test_reference_dir_without_the_model_files_fails(tmp_path):
    (tmp_path / "Model").mkdir()
    (tmp_path / "Model" / "vae.py").write_text("")
    p = _run("--reference-dir", str(tmp_path))
    assert p.returncode != 0
    assert "Model/discriminator.py" in p.stderr and "Model/laplacian_loss.py" in p.stderr
    assert "Model/vae.py" not in p.stderr.split("lacks", 1)[1].splitlines()[0]
