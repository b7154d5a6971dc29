#!/usr/bin/env bash
# in-release.sh RELEASE CMD [ARG...]: run CMD where Nix is the RELEASE's and
# nothing set up by hand is visible.
#
#   bookworm  this machine's own userland (Debian's Nix 2.8)
#   trixie    a debootstrapped trixie root (Nix 2.26), see release-root.sh
#   sid       a debootstrapped sid root (Nix 2.34)
#
# CMD runs as root in a private mount namespace where:
#   - /nix is a new, empty store (removed afterwards);
#   - /etc has no /etc/nix/nix.conf and no nixbld group or users: what a fresh
#     machine has, so the project's own settings must carry everything;
#   - for trixie and sid, / is an overlay of the cached root (never changed),
#     with this machine's /proc, /sys, /dev, /tmp, /root (tool caches, Python),
#     /usr/local and the checkout bound in at the same paths; it becomes the
#     namespace's root (pivot_root), so namespaces made inside see it too.
# The test matrix (scripts/test-matrix.sh) runs each leg of the suite here.
set -euo pipefail

release="${1:?usage: in-release.sh RELEASE CMD [ARG...]}"; shift
(($#)) || { echo "usage: in-release.sh RELEASE CMD [ARG...]" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cache="${PULUMI_NIXOS_CACHE:-$HOME/.cache/pulumi-nixos}"

case "$release" in
  bookworm) root=/ ;;
  trixie|sid) root="$(bash "$here/release-root.sh" "$release")" ;;
  *) echo "in-release: unknown release $release (bookworm, trixie, sid)" >&2; exit 2 ;;
esac

work="$(mktemp -d "${TMPDIR:-/var/tmp}/pulumi-nixos-$release.XXXXXX")"
cleanup() { rm -rf --one-file-system "$work" 2>/dev/null || true; }
trap cleanup EXIT
mkdir -p "$work/nix" "$work/root-upper" "$work/root-work" "$work/newroot"

# Everything below runs in the new mount namespace; values reach the inner
# script as arguments, never pasted into it.
inner='
set -euo pipefail
root=$1 work=$2 repo=$3; shift 3
cwd=$PWD
mount --make-rprivate /
if [[ $root == / ]]; then
  # Bind mounts, not an overlay on /etc: the lab stacks its own overlay on
  # /etc, and overlays stack only two deep (a nested leg would be three).
  for f in group gshadow passwd shadow; do
    [[ -f /etc/$f ]] || continue
    grep -v "^nixbld" "/etc/$f" > "$work/$f" || true
    mount --bind "$work/$f" "/etc/$f"
  done
  # An empty /etc/nix hides the machine nix.conf.
  if [[ -d /etc/nix ]]; then mkdir -p "$work/etc-nix" && mount --bind "$work/etc-nix" /etc/nix; fi
  mount --bind "$work/nix" /nix 2>/dev/null || { mkdir -p /nix && mount --bind "$work/nix" /nix; }
  exec "$@"
fi
new=$work/newroot
mount -t overlay overlay -o "lowerdir=$root,upperdir=$work/root-upper,workdir=$work/root-work" "$new"
rm -f "$new/etc/nix/nix.conf"
grep -v "^nixbld" "$new/etc/group" > "$work/group.new" || true; cat "$work/group.new" > "$new/etc/group"
mount -t proc proc "$new/proc"
mount --rbind /sys "$new/sys"
mount --rbind /dev "$new/dev"
mount --bind "$work/nix" "$new/nix"
mkdir -p "$new/root" "$new/usr/local"
mount --rbind /root "$new/root"
mount --rbind /usr/local "$new/usr/local"
# The checkout and what lies beside it (CI puts shared/ there) at the same path.
parent=$(dirname "$repo")
mkdir -p "$new$parent"
mount --rbind "$parent" "$new$parent"
cp /etc/resolv.conf "$new/etc/resolv.conf" 2>/dev/null || true
# The machine /tmp, not one in the overlay: the lab stacks overlays on it,
# and what labctl starts in the machine namespace (nspawn) finds the same files.
mount --rbind /tmp "$new/tmp"
# pivot_root, not chroot: the root of the namespace becomes the release root,
# so the nested lab namespaces, and nsenter into them, see it as / too.
mkdir -p "$new/.old-root"
cd "$new"
pivot_root . .old-root
umount -l /.old-root
rmdir /.old-root 2>/dev/null || true
cd "$cwd"
exec "$@"
'
# The machine's own mount namespace, for what must run outside the release
# (labctl starts systemd-nspawn there); a nested leg keeps the outermost.
export PULUMI_NIXOS_MACHINE_PID="${PULUMI_NIXOS_MACHINE_PID:-$$}"
unshare --mount --propagation private -- bash -c "$inner" in-release "$root" "$work" "$repo" "$@"
