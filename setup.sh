#!/usr/bin/env bash
# Installs everything into the active Python environment. CPU machines get the CPU torch wheel;
# packages whose metadata would drag in CUDA torch or torchvision go in with --no-deps.
set -euo pipefail
cd "$(dirname "$0")"
PIP="python -m pip --disable-pip-version-check"
if python -c "import torch" 2>/dev/null; then
  echo "torch $(python -c 'import torch;print(torch.__version__)') already installed; keeping it"
else
  $PIP install torch==2.13.0
fi
# Constrain torch to what is installed so no dependency can upgrade it.
TORCH_VERSION=$(python -c 'import torch;print(torch.__version__.split("+")[0])')
grep -v '^torch==' requirements.txt > /tmp/sae_wb_requirements.txt
echo "torch==${TORCH_VERSION}" > /tmp/sae_wb_constraints.txt
$PIP install -r /tmp/sae_wb_requirements.txt -c /tmp/sae_wb_constraints.txt
# sae-bench declares torchvision and numpy<2 but imports neither; exllamav3 only ships our text.
$PIP install --no-deps sae-bench==0.6.0 exllamav3==1.6.5
echo "setup complete"
