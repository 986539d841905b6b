#!/usr/bin/env bash
# Install the dependencies; Paddle only when none is importable, and never over a paddlepaddle-gpu.
#
#   bash tools/setup.sh [--test] [--system] [--paddle auto|cpu|gpu]
#
#   (default)      create ./.venv and install requirements.txt into it, plus the CPU
#                  Paddle (requirements-paddle-cpu.txt) when the venv has no Paddle.
#   --system       no venv: install into $PYTHON (default python3) itself, with
#                  `pip install --user` outside a virtualenv. For AI Studio and other
#                  machines whose preinstalled paddlepaddle-gpu a venv would hide.
#   --paddle auto  (default) install the CPU Paddle only when `import paddle` fails.
#   --paddle cpu   install the CPU build even if a Paddle is importable (refused over
#                  paddlepaddle-gpu: uninstall that yourself if you mean it).
#   --paddle gpu   install paddlepaddle-gpu (PADDLE_GPU_INDEX=<url> picks the CUDA-specific
#                  wheel index of paddlepaddle.org.cn); refused over an installed CPU build.
#   --test         also the test-only dependencies (requirements-test.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TEST=0 SYSTEM=0 PADDLE=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --test) TEST=1 ;;
    --system) SYSTEM=1 ;;
    --paddle) PADDLE=${2:-}; shift ;;
    --paddle=*) PADDLE=${1#--paddle=} ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $1 (see bash tools/setup.sh --help)" >&2; exit 1 ;;
  esac
  shift
done
case "$PADDLE" in auto|cpu|gpu) ;; *) echo "setup.sh: --paddle takes auto, cpu or gpu, not '$PADDLE'" >&2; exit 1 ;; esac

if [ "$SYSTEM" = 1 ]; then
  PY=$PYTHON
  PIP=("$PY" -m pip install -q)
  # --user outside a virtualenv/conda env we may not write to; inside one, pip refuses --user.
  if [ "$("$PY" -c 'import sys; print(sys.prefix != sys.base_prefix)')" = False ] \
      && [ ! -w "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" ]; then
    PIP+=(--user)
  fi
else
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  PY=.venv/bin/python
  PIP=("$PY" -m pip install -q)
fi

# Which Paddle distribution this interpreter has: paddlepaddle-gpu, paddlepaddle, or none.
installed_paddle() {
  "$PY" - <<'PYEOF'
from importlib import metadata
for dist in ('paddlepaddle-gpu', 'paddlepaddle'):
    try:
        print(dist, metadata.version(dist))
        break
    except metadata.PackageNotFoundError:
        pass
else:
    print('none')
PYEOF
}
read -r HAVE HAVE_VERSION <<<"$(installed_paddle)"

case "$PADDLE:$HAVE" in
  auto:none|cpu:none|cpu:paddlepaddle)
    "${PIP[@]}" -r requirements-paddle-cpu.txt ;;
  cpu:paddlepaddle-gpu)
    echo "setup.sh: paddlepaddle-gpu $HAVE_VERSION is installed; not replacing it with the CPU build" \
         "(pip uninstall paddlepaddle-gpu first if you mean it)" >&2; exit 1 ;;
  gpu:none|gpu:paddlepaddle-gpu)
    "${PIP[@]}" ${PADDLE_GPU_INDEX:+--index-url "$PADDLE_GPU_INDEX"} 'paddlepaddle-gpu>=2.6,<4' ;;
  gpu:paddlepaddle)
    echo "setup.sh: the CPU paddlepaddle $HAVE_VERSION is installed; pip uninstall paddlepaddle," \
         "then run --paddle gpu again (both at once break each other)" >&2; exit 1 ;;
  auto:*)
    echo "keeping the installed $HAVE $HAVE_VERSION" ;;
esac
"${PIP[@]}" -r requirements.txt
# Headers for the oneDNN convolution op of CPU training (utils/training/cpu_ops.py); x86-64 Linux only.
if [ "$(uname -sm)" = "Linux x86_64" ]; then
  "${PIP[@]}" --no-deps -r requirements-cpu-ops.txt
fi
if [ "$TEST" = 1 ]; then
  "${PIP[@]}" -r requirements-test.txt
fi

"$PY" - <<'PYEOF'
import warnings
warnings.filterwarnings('ignore')
import paddle
version = tuple(int(v) for v in paddle.__version__.split('.')[:2] if v.isdigit())
ok = (2, 6) <= version < (4, 0) or paddle.__version__.startswith('0.0.0')   # 0.0.0: a develop build
print(f"paddle {paddle.__version__} ({'CUDA' if paddle.is_compiled_with_cuda() else 'CPU'} build)"
      + ('' if ok else ' -- OUTSIDE the supported range 2.6 <= version < 4 (README, "Paddle versions"):'
                       ' expect failures; install a newer build (--paddle gpu after pip uninstall)'))
PYEOF
echo "environment ready: $PY"
