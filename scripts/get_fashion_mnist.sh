#!/usr/bin/env bash
# Install Fashion-MNIST (the Debian package dataset-fashion-mnist, 31 MB) where e2ediff looks for it.
#
#   bash scripts/get_fashion_mnist.sh          # root: apt-get install; otherwise: unpack into the user cache
#   bash scripts/get_fashion_mnist.sh --user   # unpack into the user cache even when root
#
# System path: /usr/share/datasets/fashion-mnist
# User path:   ${E2EDIFF_CACHE:-$HOME/.cache/e2ediff}/fashion-mnist/usr/share/datasets/fashion-mnist
# Both are searched by e2ediff.data.find_fashion_mnist(). Running it again does nothing once the files are there.
set -euo pipefail

PACKAGE=dataset-fashion-mnist
SYSTEM_DIR=/usr/share/datasets/fashion-mnist
CACHE_ROOT="${E2EDIFF_CACHE:-$HOME/.cache/e2ediff}/fashion-mnist"
USER_DIR="$CACHE_ROOT/usr/share/datasets/fashion-mnist"
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"

user_mode=0
case "${1:-}" in
  "") ;;
  --user) user_mode=1 ;;
  -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
  *) echo "get_fashion_mnist.sh: unknown argument '$1' (expected nothing or --user)" >&2; exit 2 ;;
esac

has_files() {  # $1: dir; true when every IDX file is there, gzipped or raw
  local f
  for f in $FILES; do
    [[ -s "$1/$f.gz" || -s "$1/$f" ]] || return 1
  done
}

done_at() {
  echo "Fashion-MNIST is in $1"
  ls -l "$1"
  exit 0
}

has_candidate() {  # true when apt knows a version of the package
  apt-cache policy "$PACKAGE" 2>/dev/null | grep -q 'Candidate: [^(]'
}

if [[ $user_mode -eq 0 ]] && has_files "$SYSTEM_DIR"; then done_at "$SYSTEM_DIR"; fi
if has_files "$USER_DIR"; then done_at "$USER_DIR"; fi

if ! command -v apt-get >/dev/null; then
  echo "get_fashion_mnist.sh: apt-get not found; this script needs a Debian/Ubuntu system with package $PACKAGE." >&2
  echo "Otherwise put {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] in a folder and set E2EDIFF_DATA_DIR to it." >&2
  exit 1
fi

if [[ $user_mode -eq 0 && $(id -u) -eq 0 ]]; then
  has_candidate || apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PACKAGE"
  has_files "$SYSTEM_DIR" || { echo "get_fashion_mnist.sh: $PACKAGE installed but $SYSTEM_DIR lacks the files" >&2; exit 1; }
  done_at "$SYSTEM_DIR"
fi

if ! has_candidate; then
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq
  else
    echo "get_fashion_mnist.sh: apt does not know $PACKAGE; ask an administrator to run 'apt-get update'." >&2
    exit 1
  fi
fi
tmp=$(mktemp -d)
# Started by root, apt downloads as user _apt, which must be able to write the temp dir.
if [[ $(id -u) -eq 0 ]] && id _apt >/dev/null 2>&1; then chown _apt "$tmp"; fi
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -qq "$PACKAGE")
mkdir -p "$CACHE_ROOT"
dpkg -x "$tmp"/"$PACKAGE"_*.deb "$CACHE_ROOT"
has_files "$USER_DIR" || { echo "get_fashion_mnist.sh: unpacked $PACKAGE but $USER_DIR lacks the files" >&2; exit 1; }
done_at "$USER_DIR"
