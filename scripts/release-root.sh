#!/usr/bin/env bash
# release-root.sh RELEASE: print the path of a Debian RELEASE root (trixie,
# sid) with Nix and what the lab needs, building it on first use.
#
# The roots give the test matrix the Nix versions users run (trixie: 2.26,
# sid: 2.34; the machine's own bookworm has 2.8) and give the lab its systemd
# hosts (systemd-nspawn -b boots a root).  They live outside the checkout,
# keyed by release and package list, so every clone on this machine shares
# them.  Packages come from the machine's own Debian mirror, as apt has it.
set -euo pipefail

release="${1:?usage: release-root.sh RELEASE}"
case "$release" in trixie|sid) ;; *) echo "release-root: unsupported release $release" >&2; exit 2 ;; esac

# What a lab host and a test leg run inside the root.  systemd + dbus make it
# bootable by systemd-nspawn; systemd-container lets a leg boot other roots.
PACKAGES=(nix-bin openssh-server openssh-client sudo iproute2 util-linux procps curl git python3 zstd
          systemd systemd-sysv dbus systemd-container passwd ca-certificates)
ROOT_FORMAT=1  # bump when the way a root is prepared changes

cache="${PULUMI_NIXOS_CACHE:-$HOME/.cache/pulumi-nixos}/roots"
key="$(printf '%s\n' "$ROOT_FORMAT" "${PACKAGES[@]}" | sha256sum | cut -c1-12)"
root="$cache/$release-$key"
log() { echo "release-root[$release]: $*" >&2; }

mkdir -p "$cache"
exec 9>"$cache/.$release.lock"
flock 9
if [[ -f "$root/.complete" ]]; then echo "$root"; exit 0; fi

# The mirror apt already uses on this machine (deb822 or one-line sources).
mirror="$(sed -n 's/^URIs:[[:space:]]*\(http[^ ]*\/debian\)[[:space:]]*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)"
if [[ -z "$mirror" ]]; then
  mirror="$(sed -n 's/^deb[[:space:]]\+\(http[^ ]*\/debian\)[[:space:]].*/\1/p' /etc/apt/sources.list 2>/dev/null | head -n1)"
fi
[[ -n "$mirror" ]] || { log "no Debian mirror found in apt's sources"; exit 1; }
command -v debootstrap >/dev/null || { log "debootstrap is missing (scripts/setup.sh installs it)"; exit 1; }

rm -rf "$root.tmp"
mkdir -p "$root.tmp"
started=$(date +%s)
log "debootstrap (minbase) into $root.tmp"
# sid's Release file may be past its Valid-Until on a mirror snapshot.
debootstrap --variant=minbase --no-check-gpg "$release" "$root.tmp" "$mirror" >"$cache/$release.debootstrap.log" 2>&1 \
  || { log "debootstrap failed; see $cache/$release.debootstrap.log"; tail -n 20 "$cache/$release.debootstrap.log" >&2; exit 1; }

cleanup() { umount -l "$root.tmp/proc" 2>/dev/null || true; umount -l "$root.tmp/dev" 2>/dev/null || true; }
trap cleanup EXIT
mount -t proc proc "$root.tmp/proc"   # sid's nix-bin needs /proc while it installs
mount --rbind /dev "$root.tmp/dev"
cp /etc/resolv.conf "$root.tmp/etc/resolv.conf" 2>/dev/null || true
printf '#!/bin/sh\nexit 101\n' > "$root.tmp/usr/sbin/policy-rc.d"  # install starts no services
chmod 0755 "$root.tmp/usr/sbin/policy-rc.d"
in_root() { chroot "$root.tmp" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
log "installing ${PACKAGES[*]}"
in_root apt-get -o Acquire::Check-Valid-Until=false update -q >>"$cache/$release.debootstrap.log" 2>&1
in_root apt-get -o Acquire::Check-Valid-Until=false install -y -q --no-install-recommends "${PACKAGES[@]}" \
  >>"$cache/$release.debootstrap.log" 2>&1 \
  || { log "apt-get install failed; see $cache/$release.debootstrap.log"; tail -n 20 "$cache/$release.debootstrap.log" >&2; exit 1; }
rm -f "$root.tmp/usr/sbin/policy-rc.d"
in_root apt-get clean
# No host keys baked into the root: every lab host makes or is given its own.
rm -f "$root.tmp"/etc/ssh/ssh_host_*
# Nothing of the machine that built it: the lab writes nix.conf per host.
rm -rf "$root.tmp/etc/nix/nix.conf" "$root.tmp/nix"
mkdir -p "$root.tmp/nix"
in_root nix --version > "$root.tmp/.nix-version"  # needs /proc
cleanup
trap - EXIT
touch "$root.tmp/.complete"
mv "$root.tmp" "$root"
log "ready in $(( $(date +%s) - started ))s: $(cat "$root/.nix-version")"
echo "$root"
