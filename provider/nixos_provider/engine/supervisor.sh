#!/bin/sh
# pulumi-nixos activation supervisor.
#
# Uploaded to the target for each deployment and started detached from the SSH
# session (systemd-run, or setsid), so a dropped connection cannot stop an
# activation halfway.  It activates the new generation, then, with magic
# rollback, waits for the deployer to prove it can still reach the host by
# writing this deployment's token into $dir/confirm over a NEW connection.
# Without that proof, or when activation fails, it rolls back by itself:
# re-point the profile at the previous generation, re-activate it, and delete
# the failed generation.  Progress is the one-line file $dir/state.
#
# Arguments are positional and always all present ("" for none):
#   task dir token mode profile new_path new_gen prev_gen prev_path action
#   magic confirm_timeout auto_rollback activation_timeout activate_cmd
set -u
task=$1 dir=$2 token=$3 mode=$4 profile=$5 new_path=$6 new_gen=$7 prev_gen=$8
prev_path=$9; shift 9
action=$1 magic=$2 confirm_timeout=$3 auto_rollback=$4 activation_timeout=$5 activate_cmd=$6

exec >>"$dir/log" 2>&1 </dev/null
export PATH="/run/current-system/sw/bin:/run/wrappers/bin:$PATH:/usr/bin:/bin"

state() {
  printf '%s\n' "$*" >"$dir/state.tmp" && mv -f "$dir/state.tmp" "$dir/state"
}

activate() { # activate PATH
  if [ "$mode" = system ]; then
    timeout "$activation_timeout" "$1/bin/switch-to-configuration" "$2"
  elif [ -n "$activate_cmd" ]; then
    (cd "$profile" && PROFILE="$profile" timeout "$activation_timeout" /bin/sh -c "$activate_cmd")
  fi
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
    nix-env -p "$profile" --switch-generation "$prev_gen" || { state "rollback-failed $1: cannot switch $profile to generation $prev_gen"; return 1; }
  fi
  # Re-activate the previous generation the way the failed one was activated.
  if ! activate "$prev_path" "$action"; then
    state "rollback-failed $1: re-activating $prev_path failed"
    return 1
  fi
  if [ -n "$new_gen" ] && [ -n "$prev_gen" ]; then
    nix-env -p "$profile" --delete-generations "$new_gen" || true
  fi
  state "rolled-back $1"
}

if [ "$task" = rollback ]; then
  rollback requested
  exit 0
fi

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

if [ "$magic" != 1 ]; then
  state done
  exit 0
fi

state waiting-confirm
deadline=$(( $(date +%s) + confirm_timeout ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  if [ -f "$dir/confirm" ] && [ "$(cat "$dir/confirm")" = "$token" ]; then
    echo "pulumi-nixos: confirmed"
    state done
    exit 0
  fi
  sleep 0.2
done
echo "pulumi-nixos: no confirmation within ${confirm_timeout}s"
rollback unconfirmed
exit 0
