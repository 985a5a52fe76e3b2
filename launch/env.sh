# Sourced by the other launch scripts. PY: the Python that runs hooktrain -- $PYTHON if set,
# else the active virtual environment's, else this checkout's .venv (what launch/install.sh
# makes), else `python` on PATH. torchrun runs as `$PY -m torch.distributed.run`, the one
# installed beside hooktrain.
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$checkout/.venv/bin/python" ]; then
  PY=$checkout/.venv/bin/python
else
  PY=python
fi
