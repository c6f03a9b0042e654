#!/usr/bin/env bash
# Install the pinned dependencies and the collection's `custom_components` package (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet -r requirements.txt
python3 -m pip install --quiet --no-deps -e .
python3 -c "import torch, monai, custom_components; print(f'torch {torch.__version__}, monai {monai.__version__}, custom_components {custom_components.__version__}')"
