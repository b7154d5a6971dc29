#!/bin/sh
# A lab host's boot loader and stage 2.
#   lab-boot.sh choose    the boot loader: the one-shot entry if one is set (used
#                         up, as systemd-boot uses up LoaderEntryOneShot), else
#                         the default entry, becomes /run/booted-system; sshd is
#                         to listen where that system says, from its start (on
#                         NixOS sshd's configuration is the booted system's)
#   lab-boot.sh activate  stage 2: `switch-to-configuration test` of it
#   lab-boot.sh           both (namespace hosts, which have no units)
set -eu
lab=/etc/lab
step="${1:-all}"
if [ "$step" != activate ]; then
  system=""
  oneshot="$(cat "$lab/boot-oneshot" 2>/dev/null || true)"
  rm -f "$lab/boot-oneshot"
  case "$oneshot" in
    nixos-generation-*.conf)
      n="$(printf '%s' "$oneshot" | sed 's/^nixos-generation-//; s/\.conf$//')"
      system="$(awk -v n="$n" '$1 == n { print $2 }' "$lab/boot-entries" 2>/dev/null || true)" ;;
  esac
  # GRUB: next_entry in grubenv (grub-reboot), used up by this boot as NixOS's grub.cfg does; a title path
  # ("submenu>entry") names the entry whose init= is the system.
  grubenv=/boot/grub/grubenv
  next="$(sed -n 's/^next_entry=//p' "$grubenv" 2>/dev/null | head -n 1)"
  if [ -n "$next" ]; then
    oneshot="$next"
    sed -i '/^next_entry=/d' "$grubenv"
    submenu="" title="$next"
    case "$next" in *">"*) submenu="${next%%>*}" title="${next#*>}" ;; esac
    system="$(awk -v submenu="$submenu" -v title="$title" '
      /^submenu "/ { inside = (index($0, "submenu \"" submenu "\"") == 1); next }
      /^menuentry "/ { found = (index($0, "menuentry \"" title "\"") == 1) && (submenu == "" || inside); next }
      found && /init=/ { sub(/.*init=/, ""); sub(/\/init$/, ""); print; exit }
    ' /boot/grub/grub.cfg 2>/dev/null || true)"
  fi
  if [ -z "$system" ]; then
    [ -z "$oneshot" ] || echo "lab-boot: no boot entry $oneshot: booting the default" >&2
    system="$(readlink "$lab/boot-default")"
  fi
  ln -sfn "$system" /run/booted-system
  if [ -d /run/systemd/system ]; then
    port="$(cat "$system/etc/lab/ssh-port")"
    [ -n "$port" ] || port="$(cat "$lab/ssh-port-default")"
    mkdir -p /run/lab
    printf 'LAB_SSH_PORT=%s\n' "$port" > /run/lab/sshd.env
    echo "$port" > /run/lab/sshd-port
  fi
fi
[ "$step" = choose ] && exit 0
exec "$(readlink /run/booted-system)/bin/switch-to-configuration" test
