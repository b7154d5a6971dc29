#!/bin/sh
# The lab's switch-to-configuration.  It acts the way NixOS's does, for the
# parts a deployer can observe: /run/current-system, the boot entry, a service
# that restarts when its configuration changes, sshd's port, and exit status 4
# when a unit fails.  It runs inside a lab host's mount namespace, where /etc,
# /run and /nix are the host's own.  On a host where systemd runs
# (/run/systemd/system exists: the systemd-nspawn lab hosts), the lab service
# and sshd are real units, managed through systemctl as NixOS's script does.
set -eu
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
out="@out@"
action="${1:-}"
case "$action" in
  switch|boot|test|dry-activate) ;;
  *) echo "Usage: $0 [switch|boot|test|dry-activate]" >&2; exit 1 ;;
esac

lab=/etc/lab
state=/run/lab
mkdir -p "$state"
current="$(readlink /run/current-system 2>/dev/null || true)"
default_port="$(cat "$lab/ssh-port-default")"
want_port="$(cat "$out/etc/lab/ssh-port")"
[ -n "$want_port" ] || want_port="$default_port"
running_port="$(cat "$state/sshd-port" 2>/dev/null || echo "$default_port")"

service_changed() {
  [ -z "$current" ] && return 0
  ! cmp -s "$out/etc/lab/service.json" "$current/etc/lab/service.json" && return 0
  ! cmp -s "$out/etc/lab/packages" "$current/etc/lab/packages" && return 0
  return 1
}

if [ -d /run/systemd/system ]; then systemd=1; ssh_unit=ssh.service; else systemd=0; ssh_unit=sshd.service; fi

if [ "$action" = dry-activate ]; then
  units=""
  if service_changed; then units="lab-service.service"; fi
  if [ "$want_port" != "$running_port" ]; then units="${units:+$units, }$ssh_unit"; fi
  echo "would restart the following units: ${units}" >&2
  exit 0
fi

if [ "$action" = switch ] || [ "$action" = boot ]; then
  echo "updating GRUB 2 menu..." >&2
  ln -sfn "$out" "$lab/boot-default"
  # The menu: one entry per generation of the system profile, as GRUB's builder lists them.
  for link in /nix/var/nix/profiles/system-*-link; do
    [ -e "$link" ] || continue
    n="${link#/nix/var/nix/profiles/system-}"
    printf '%s %s\n' "${n%-link}" "$(readlink -f "$link")"
  done | sort -n > "$lab/boot-entries"
  # A GRUB system writes grub.cfg as NixOS's install-grub.pl does, for the parts a deployer reads: the default
  # entry "NixOS", then the submenu "NixOS - All configurations" with "NixOS - Configuration N (date - version)",
  # newest first, each booting its system (init=); the date is the generation link's, as install-grub.pl's lstat.
  if [ "$(cat "$out/etc/lab/boot-loader" 2>/dev/null || true)" = grub ]; then
    mkdir -p /boot/grub
    {
      echo 'if [ -s $prefix/grubenv ]; then load_env; fi'
      echo 'if [ "${next_entry}" ]; then set default="${next_entry}"; set next_entry=; save_env next_entry; else set default=0; fi'
      printf 'menuentry "NixOS" --class nixos --unrestricted {\n  linux %s/kernel init=%s/init\n}\n' "$out" "$out"
      echo 'submenu "NixOS - All configurations" --class submenu {'
      sort -rn "$lab/boot-entries" | while read -r n path; do
        printf 'menuentry "NixOS - Configuration %s (%s - %s)" --class nixos {\n  linux %s/kernel init=%s/init\n}\n' \
          "$n" "$(date -u -d "@$(stat -c %Y "/nix/var/nix/profiles/system-$n-link")" +%F)" \
          "$(cat "$path/nixos-version")" "$path" "$path"
      done
      echo '}'
    } > /boot/grub/grub.cfg.new
    mv /boot/grub/grub.cfg.new /boot/grub/grub.cfg
  fi
fi
[ "$action" = boot ] && exit 0

echo "activating the configuration..." >&2
# /etc/os-release belongs to the system, as NixOS's etc activation has it.
rm -f /etc/os-release
cp "$out/etc/os-release" /etc/os-release
slow="$(cat "$out/etc/lab/slow-activation")"
if [ -n "$slow" ] && [ "$slow" != 0 ]; then
  echo "running slow activation script ($slow s)..." >&2
  sleep "$slow"
fi
# The activationReads fault: activation needs a file, as agenix's needs its
# key. It records the content's SHA-256 (never the content) for the tests.
reads="$(cat "$out/etc/lab/activation-reads" 2>/dev/null || true)"
if [ -n "$reads" ]; then
  if [ ! -r "$reads" ]; then
    echo "activation: cannot read $reads (as agenix cannot decrypt without its key)" >&2
    exit 1
  fi
  sha256sum < "$reads" | cut -d' ' -f1 > "$state/activation-read"
fi
ln -sfn "$out" /run/current-system

if [ "$systemd" = 1 ]; then
  # The generation's lab-service.service, as NixOS links a generation's units
  # into /etc/systemd/system.  Type=notify: `systemctl restart` returns once
  # the service listens, or fails when it cannot start.
  unit=/run/systemd/system/lab-service.service
  {
    echo "[Unit]"
    echo "Description=Lab HTTP service of $(cat "$out/nixos-version")"
    echo "[Service]"
    echo "Type=notify"
    echo "NotifyAccess=main"
    if [ -n "$(cat "$out/etc/lab/activation-fails")" ]; then
      # The activation-fails fault: the unit's start fails, as a broken configuration would.
      echo "ExecStartPre=/bin/sh -c 'echo \"lab-service: refusing to start: this configuration is broken (activationFails fault)\" >&2; exit 1'"
    fi
    echo "ExecStart=/usr/bin/python3 $out/sw/bin/lab-service $out"
  } > "$unit.new"
  if cmp -s "$unit.new" "$unit"; then rm -f "$unit.new"; else mv -f "$unit.new" "$unit"; systemctl daemon-reload; fi
  failed=""
  if service_changed || ! systemctl is-active --quiet lab-service.service; then
    echo "restarting the following units: lab-service.service" >&2
    systemctl reset-failed lab-service.service 2>/dev/null || true
    systemctl restart lab-service.service || failed="lab-service.service"
  fi
  if [ "$want_port" != "$running_port" ] || ! systemctl is-active --quiet ssh.service; then
    echo "restarting the following units: ssh.service" >&2
    # ssh.service reads the port from here (tests/lab/systemd/ssh.conf).
    printf 'LAB_SSH_PORT=%s\n' "$want_port" > "$state/sshd.env"
    if systemctl restart ssh.service; then
      echo "$want_port" > "$state/sshd-port"
    else
      failed="${failed:+$failed }ssh.service"
    fi
  fi
  if [ -n "$failed" ]; then
    echo "warning: the following units failed: $failed" >&2
    for u in $failed; do systemctl status --no-pager --lines=5 "$u" >&2 || true; done
    exit 4
  fi
  exit 0
fi

restart_service=0
service_changed && restart_service=1
[ -f "$state/service.pid" ] && kill -0 "$(cat "$state/service.pid")" 2>/dev/null || restart_service=1
if [ "$restart_service" = 1 ]; then
  echo "restarting the following units: lab-service.service" >&2
  if [ -f "$state/service.pid" ]; then
    kill "$(cat "$state/service.pid")" 2>/dev/null || true
    rm -f "$state/service.pid"
  fi
  if [ -n "$(cat "$out/etc/lab/activation-fails")" ]; then
    echo "Job for lab-service.service failed because the control process exited with error code." >&2
    echo "warning: the following units failed: lab-service.service" >&2
    exit 4
  fi
  rm -f "$state/service.ready"
  setsid /usr/bin/python3 "$out/sw/bin/lab-service" "$out" </dev/null >>"$state/service.log" 2>&1 &
  echo $! > "$state/service.pid"
  # Like a Type=notify unit: wait until the service is listening (or gave up).
  i=0
  while [ ! -e "$state/service.ready" ] && kill -0 "$(cat "$state/service.pid")" 2>/dev/null && [ $i -lt 100 ]; do
    sleep 0.05; i=$((i+1))
  done
fi

sshd_running() { [ -f /run/sshd.pid ] && kill -0 "$(cat /run/sshd.pid)" 2>/dev/null; }
if [ "$want_port" != "$running_port" ] || ! sshd_running; then
  echo "restarting the following units: sshd.service" >&2
  if [ -f /run/sshd.pid ]; then
    kill "$(cat /run/sshd.pid)" 2>/dev/null || true
    i=0; while [ -f /run/sshd.pid ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  fi
  # sshd.service's preStart: a freshly installed host makes its own host key.
  if [ ! -f /etc/ssh/ssh_host_ed25519_key ]; then
    ssh-keygen -q -t ed25519 -N "" -C "root@installed" -f /etc/ssh/ssh_host_ed25519_key
  fi
  /usr/sbin/sshd -f /etc/ssh/sshd_config -o "Port=$want_port"
  echo "$want_port" > "$state/sshd-port"
fi
exit 0
