#!/bin/sh
# pulumi-nixos activation supervisor.
#
# Uploaded to the target for each deployment and started detached from the SSH
# session (systemd-run, or setsid), so a dropped connection cannot stop an
# activation halfway.
#
# One deployment per profile per host at a time: the supervisor takes a lock
# (flock on $lock, beside the profile) before the deployer registers anything,
# holds it for its whole life, and writes into it who holds it and since when.
# A second deployment's supervisor finds the lock taken and says so.
#
# The life of one deployment, as the one-line file $dir/state shows it:
#   ready            the lock is ours; waiting for the deployer's $dir/go (how
#                    long its health checks may take after activation)
#   registering      nix-env makes the new generation, here under the lock, so a
#                    deployer that stops answering cannot leave the profile a
#                    generation ahead; then $dir/registered says which
#                    (new_gen, prev_gen, prev_path, a line each)
#   activating       the new generation's activation runs
#   waiting-confirm  magic rollback: waiting for this deployment's token in
#                    $dir/confirm, written by the deployer over a NEW connection
#   confirmed        waiting for the deployer's last word (after its health
#                    checks): $dir/finish keeps the generation
#   done | failed ... | rolled-back ... | rollback-failed ... | locked-out ...
# $dir/abort (the deployer was cancelled, or a health check failed) rolls back
# at the next step; so do a missing confirmation and a deployer that never
# says its last word. Rollback: re-point the profile at the previous
# generation, re-activate it, and delete the failed generation.
#
# The second task, rollback-to (destroy's rollback), takes the same lock,
# re-points the profile at generation --to-gen (or, when that generation was
# garbage-collected, registers --to-path again if the store still has it),
# re-activates it, and ends `done`, `failed gone: ...` or
# `failed activation-failed:N`.
#
# Options are named, each followed by its value (never pasted into a script):
#   --task activate --dir DIR --token TOKEN --mode system|profile --profile PATH
#   --new-path STORE_PATH --action ACTION [--magic-rollback 0|1]
#   [--confirm-timeout S] [--auto-rollback 0|1] [--activation-timeout S]
#   [--activate-command CMD] [--ready-timeout S]
#   --task rollback-to --dir DIR --token TOKEN --mode system|profile
#   --profile PATH --to-gen N [--to-path STORE_PATH] [--activation-timeout S]
#   [--activate-command CMD]
# A malformed command line ends with the state `failed usage: ...`, when $dir
# is known.
set -u
task=activate dir="" token="" mode="" profile="" new_path="" new_gen="" prev_gen="" prev_path="" action=""
magic=0 confirm_timeout=30 auto_rollback=1 activation_timeout=240 activate_cmd="" to_gen="" to_path=""
# The deployer says go within a second or two; a deployer that died before
# that must not hold the host for long (one that is merely slow keeps touching
# $dir/alive).
ready_timeout=30
usage=""
while [ $# -gt 0 ]; do
  if [ $# -lt 2 ]; then usage="$1 needs a value"; break; fi
  case $1 in
    --task) task=$2 ;;
    --dir) dir=$2 ;;
    --token) token=$2 ;;
    --mode) mode=$2 ;;
    --profile) profile=$2 ;;
    --new-path) new_path=$2 ;;
    --action) action=$2 ;;
    --magic-rollback) magic=$2 ;;
    --confirm-timeout) confirm_timeout=$2 ;;
    --auto-rollback) auto_rollback=$2 ;;
    --activation-timeout) activation_timeout=$2 ;;
    --activate-command) activate_cmd=$2 ;;
    --ready-timeout) ready_timeout=$2 ;;
    --to-gen) to_gen=$2 ;;
    --to-path) to_path=$2 ;;
    *) usage="unknown option $1"; break ;;
  esac
  shift 2
done
is_number() { case $1 in ''|*[!0-9]*) return 1 ;; esac; }
require() { # require OPTION VALUE: the first missing option is the one reported
  [ -n "$2" ] || usage=${usage:-"$1 is required"}
}
require --dir "$dir"; require --token "$token"; require --profile "$profile"
if [ "$task" = rollback-to ]; then
  require --to-gen "$to_gen"
  action=switch
else
  require --new-path "$new_path"; require --action "$action"
fi
if [ -z "$usage" ]; then
  case $task:$mode:$magic:$auto_rollback in
    activate:system:[01]:[01] | activate:profile:[01]:[01] | rollback-to:system:[01]:[01] | rollback-to:profile:[01]:[01]) ;;
    *) usage="bad --task, --mode, --magic-rollback or --auto-rollback: $task $mode $magic $auto_rollback" ;;
  esac
fi
for n in "$to_gen"; do
  [ -z "$usage" ] && [ -n "$n" ] && ! is_number "$n" && usage="a generation is a number, not $n"
done
if [ -z "$usage" ] && ! { is_number "$confirm_timeout" && is_number "$activation_timeout" \
                           && is_number "$ready_timeout"; }; then
  usage="timeouts are whole seconds: $confirm_timeout $activation_timeout $ready_timeout"
fi
if [ -n "$usage" ]; then
  echo "pulumi-nixos supervisor: $usage" >&2
  if [ -n "$dir" ] && [ -d "$dir" ]; then printf 'failed usage: %s\n' "$usage" >"$dir/state"; fi
  exit 2
fi
hold=60

exec >>"$dir/log" 2>&1 </dev/null
export PATH="/run/current-system/sw/bin:/run/wrappers/bin:$PATH:/usr/bin:/bin"

state() {
  printf '%s\n' "$*" >"$dir/state.tmp" && mv -f "$dir/state.tmp" "$dir/state"
}

now() { date +%s; }

# Children must not inherit the lock (fd 9): a service started by an
# activation would otherwise hold it long after we are gone.
activate() { # activate PATH ACTION
  if [ "$mode" = system ]; then
    timeout "$activation_timeout" "$1/bin/switch-to-configuration" "$2" 9>&-
  elif [ -n "$activate_cmd" ]; then
    (cd "$profile" && PROFILE="$profile" timeout "$activation_timeout" /bin/sh -c "$activate_cmd") 9>&-
  fi
}

gen_of() { # gen_of LINK-NAME: system-12-link -> 12
  n=${1%-link}; printf '%s' "${n##*-}"
}

rollback() { # rollback REASON
  echo "pulumi-nixos: rolling back ($1)"
  state "rolling-back $1"
  if [ -z "$prev_path" ]; then
    if [ "$mode" = profile ] && [ -n "$new_gen" ]; then
      # The profile did not exist before this deployment: remove it.
      rm -f "$profile" "$profile-$new_gen-link"
      state "rolled-back $1"
      return 0
    fi
    state "rollback-failed $1: there is no previous generation to return to"
    return 1
  fi
  if [ -n "$prev_gen" ] && [ -n "$new_gen" ]; then
    nix-env -p "$profile" --switch-generation "$prev_gen" 9>&- || { state "rollback-failed $1: cannot switch $profile to generation $prev_gen"; return 1; }
  fi
  # Re-activate the previous generation the way the failed one was activated.
  if ! activate "$prev_path" "$action"; then
    state "rollback-failed $1: re-activating $prev_path failed"
    return 1
  fi
  if [ -n "$new_gen" ] && [ -n "$prev_gen" ]; then
    nix-env -p "$profile" --delete-generations "$new_gen" 9>&- || true
  fi
  state "rolled-back $1"
}

# Before go nothing was registered or activated: stop, having changed nothing.
unregister() { # unregister REASON
  state "rolled-back $1"
}

# -- the lock ------------------------------------------------------------------
# (profiles.deployment_lock names the same file: keepGenerations deletes generations under it.)
lock="$(dirname -- "$profile")/.$(basename -- "$profile").pulumi-nixos.lock"
# (A failed redirection of `exec` would end the shell: try with touch first.)
if ! touch -- "$lock"; then
  state "failed lock: cannot open $lock"
  exit 0
fi
exec 9>>"$lock"
if ! flock -n 9; then
  state "locked-out $(head -c 400 -- "$lock" | tr '\n' ' ')"
  exit 0
fi
if [ "$task" = rollback-to ]; then what="rollback to generation $to_gen"; else what=$new_path; fi
printf 'deployment %s of %s, since %s (supervisor pid %s)\n' \
  "$dir" "$what" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$$" >"$lock"
echo "pulumi-nixos: holding $lock"

# -- rollback-to: destroy's return to an earlier generation ------------------------
if [ "$task" = rollback-to ]; then
  state "rolling-back requested"
  link="$profile-$to_gen-link"
  if [ -L "$link" ] && [ -e "$link" ]; then
    nix-env -p "$profile" --switch-generation "$to_gen" 9>&- \
      || { state "failed switch: cannot switch $profile to generation $to_gen"; exit 0; }
    path=$(readlink -f -- "$link")
  elif [ -n "$to_path" ] && nix-store --check-validity "$to_path" 9>&- 2>/dev/null; then
    echo "pulumi-nixos: generation $to_gen is gone; re-registering $to_path"
    nix-env -p "$profile" --set "$to_path" 9>&- \
      || { state "failed switch: cannot register $to_path in $profile"; exit 0; }
    path=$to_path
  else
    state "failed gone: generation $to_gen of $profile no longer exists"
    exit 0
  fi
  echo "pulumi-nixos: re-activating generation $to_gen ($path)"
  activate "$path" switch
  code=$?
  if [ $code -ne 0 ]; then
    echo "pulumi-nixos: activation exited with status $code"
    state "failed activation-failed:$code"
    exit 0
  fi
  state done
  exit 0
fi

# -- the deployer's go --------------------------------------------------------------
initial=$(readlink -- "$profile" 2>/dev/null || true)
state ready
# The deployer touches $dir/alive every few seconds while it reads the host (a
# busy host can take long): give up ready_timeout after its last sign of life.
deadline=$(( $(now) + ready_timeout ))
while [ ! -f "$dir/go" ]; do
  if [ -f "$dir/abort" ]; then unregister aborted; exit 0; fi
  if [ "$(now)" -ge "$deadline" ]; then
    alive=$(stat -c %Y -- "$dir/alive" 2>/dev/null || echo 0)
    if [ $(( alive + ready_timeout )) -le "$(now)" ]; then unregister "no-word-from-the-deployer"; exit 0; fi
    deadline=$(( alive + ready_timeout ))
  fi
  sleep 0.1
done
read -r hold <"$dir/go"

# -- registration, under the lock --------------------------------------------------
if [ "$mode" = system ]; then
  prev_path=$(readlink -e /run/current-system 2>/dev/null || true)
else
  prev_path=$(readlink -e -- "$profile" 2>/dev/null || true)
fi
if [ "$action" != test ]; then
  state registering
  echo "pulumi-nixos: registering $new_path in $profile"
  if ! nix-env -p "$profile" --set "$new_path" 9>&-; then
    state "failed register: nix-env could not make $new_path a generation of $profile"
    exit 0
  fi
  registered=$(readlink -- "$profile" 2>/dev/null || true)
  # nix-env --set reuses the current generation when the path is unchanged:
  # then there is no generation to switch away from or delete on rollback.
  if [ -n "$registered" ] && [ "$registered" != "$initial" ]; then
    new_gen=$(gen_of "$registered")
    if [ -n "$initial" ]; then prev_gen=$(gen_of "$initial"); fi
  fi
fi
printf '%s\n%s\n%s\n' "$new_gen" "$prev_gen" "$prev_path" >"$dir/registered.tmp" \
  && mv -f "$dir/registered.tmp" "$dir/registered"

# -- activation --------------------------------------------------------------------
state activating
echo "pulumi-nixos: activating $new_path ($action)"
activate "$new_path" "$action"
code=$?
if [ $code -ne 0 ]; then
  echo "pulumi-nixos: activation exited with status $code"
  if [ "$auto_rollback" = 1 ]; then
    rollback "activation-failed:$code"
  else
    state "failed activation-failed:$code"
  fi
  exit 0
fi
if [ -f "$dir/abort" ]; then rollback aborted; exit 0; fi

if [ "$magic" = 1 ]; then
  state waiting-confirm
  deadline=$(( $(now) + confirm_timeout ))
  confirmed=0
  while [ "$(now)" -lt "$deadline" ]; do
    if [ -f "$dir/abort" ]; then rollback aborted; exit 0; fi
    if [ -f "$dir/confirm" ] && [ "$(cat "$dir/confirm")" = "$token" ]; then
      echo "pulumi-nixos: confirmed"
      confirmed=1
      break
    fi
    sleep 0.2
  done
  if [ $confirmed != 1 ]; then
    echo "pulumi-nixos: no confirmation within ${confirm_timeout}s"
    rollback unconfirmed
    exit 0
  fi
fi

# -- the deployer's last word ------------------------------------------------------------
state confirmed
deadline=$(( $(now) + hold ))
while [ ! -f "$dir/finish" ]; do
  if [ -f "$dir/abort" ]; then rollback requested; exit 0; fi
  if [ "$(now)" -ge "$deadline" ]; then
    echo "pulumi-nixos: no word from the deployer within ${hold}s after activation"
    if [ "$auto_rollback" = 1 ]; then rollback "no-word-from-the-deployer"; else state done; fi
    exit 0
  fi
  sleep 0.1
done
state done
exit 0
