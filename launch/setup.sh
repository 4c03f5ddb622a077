#!/usr/bin/env bash
# Installs mmsafe and everything it needs on a fresh Debian/Ubuntu machine with
# Python >= 3.11: the Debian packages behind the embedded audio data and the
# clip datasets' preprocessing (espeak-ng, Asterisk digit recordings, ffmpeg), then
# mmsafe itself (editable) with the given pip extras into the active Python.
#
#   bash launch/setup.sh            # library + experiments
#   bash launch/setup.sh test       # ... plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
debian_packages=(
  espeak-ng ffmpeg
  asterisk-core-sounds-en-wav asterisk-core-sounds-es-wav asterisk-core-sounds-fr-wav
  asterisk-core-sounds-it-wav asterisk-core-sounds-ru-wav asterisk-prompt-it-menardi-wav
)
if command -v apt-get >/dev/null; then
  missing=()
  for p in "${debian_packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
else
  echo "setup.sh: no apt-get; install ${debian_packages[*]} yourself for the av_digits data" >&2
fi

python -m pip install -q --upgrade pip
# setuptools reports every editable install ("Editable installation.", whichever
# editable mode) as a warning a user can do nothing about: filtered in pip's process.
python -W "ignore:Editable installation" -m pip install -q -e ".${extras:+[$extras]}"
