"""A deployment that reboots into the new system once, and keeps it only when it booted and is healthy.

deploy-rs, colmena and nixos-rebuild can reboot, but none of them protects a machine from a generation that does
not boot. Here the new generation is booted *once*:

1. Under the deployments' lock (the supervisors' lock file): the new system becomes a generation, then the profile
   goes back to the generation before, whose `switch-to-configuration boot` keeps it the default boot entry, and
   the new generation becomes the boot loader's one-shot entry (systemd-boot: `bootctl set-oneshot
   nixos-generation-N.conf`, the EFI variable the boot loader uses up on the next boot; GRUB: `grub-reboot` with
   the entry's titles, next_entry in grubenv, which NixOS's grub.cfg uses up). A mark with this
   deployment's token is left beside the profile.
2. Reboot, and wait for the host within `reboot_timeout`: another boot id, and a boot that has settled
   (`systemctl is-system-running --wait`).
3. Over the new connection: the host booted the new system (`/run/booted-system`) and has this deployment's mark;
   then the health checks.
4. Only then the new generation becomes the profile's, and so the default entry.

When it fails, the profile and the default entry never moved: a host that came back on the old system has the new
generation removed; one that fails its checks is rebooted into the default; one that does not come back at all
boots the default on its next boot or power cycle, since the one-shot entry is used up. The error says which, and
what the host runs or will run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..errors import ConnectError, DeployError, EngineError, HostBusy
from ..models import BOOT_FILES, DeployRequest, Generation
from ..transport.process import Target
from . import profiles
from .health import run_health_checks

StatusFn = Callable[[str], None]
Connect = Callable[[], Awaitable[Target]]
POLL_SECONDS = 1.0  # between attempts to reach a rebooting host

# NixOS's own tools, first: on a NixOS host `bootctl` is the booted system's (sw/bin).
_NIXOS_PATH = 'PATH=/run/current-system/sw/bin:$PATH; export PATH'

# Whether the new system's kernel, initrd or modules differ from the booted ones (reboot: ifNeeded): the rule of
# needsReboot. A host that cannot say (no /run/booted-system) is rebooted.
_NEEDS_REBOOT = r"""
new=$1; shift
[ -e /run/booted-system ] || { echo yes; exit 0; }
for f in "$@"; do
  [ "$(readlink -f "/run/booted-system/$f")" = "$(readlink -f "$new/$f")" ] || { echo yes; exit 0; }
done
echo no
"""

# The boot loader's one-shot entry. systemd-boot: `bootctl set-oneshot` (an EFI variable the boot loader uses
# up). GRUB: `grub-reboot` sets next_entry in /boot/grub/grubenv, which NixOS's grub.cfg (install-grub.pl) uses up
# at the next boot; the entry is named by its titles, "NixOS - All configurations>NixOS - Configuration N (date -
# version)", read from grub.cfg (with specialisations, generation N is a submenu whose first entry is its default).
# NixOS's grub module puts grub-reboot and grub-editenv in the system's sw/bin.
_ONE_SHOT = _NIXOS_PATH + r"""
loader() {
  if [ "$(bootctl is-installed 2>/dev/null)" = yes ]; then echo systemd-boot
  elif command -v grub-reboot >/dev/null 2>&1 && [ -f /boot/grub/grub.cfg ]; then echo grub
  fi
}
grub_entry() {
  awk -v n="$1" '
    function title(line) { sub(/^[ \t]*(menuentry|submenu)[ \t]+"/, "", line); sub(/".*$/, "", line); return line }
    /^[ \t]*submenu[ \t]+"/ { path[++depth] = title($0); entry[depth] = 0; next }
    /^[ \t]*menuentry[ \t]+"/ {
      t = title($0); entry[depth + 1] = 1
      if (depth >= 1 && path[1] ~ / - All configurations$/ &&
          (index(t, " - Configuration " n " (") || (depth >= 2 && index(path[2], " - Configuration " n " (")))) {
        p = ""; for (i = 1; i <= depth; i++) p = p path[i] ">"; print p t; exit
      }
      next
    }
    /^[ \t]*}[ \t]*$/ { if (entry[depth + 1]) entry[depth + 1] = 0; else if (depth > 0) depth-- }
  ' /boot/grub/grub.cfg
}
# set_oneshot N: boot generation N once; set_oneshot "": forget the one-shot entry.
set_oneshot() {
  case "$(loader)" in
    systemd-boot) if [ -n "$1" ]; then bootctl set-oneshot "nixos-generation-$1.conf"; else bootctl set-oneshot ""; fi ;;
    grub)
      if [ -z "$1" ]; then grub-editenv /boot/grub/grubenv unset next_entry; return; fi
      entry=$(grub_entry "$1")
      [ -n "$entry" ] || { echo "no entry for generation $1 in /boot/grub/grub.cfg" >&2; return 1; }
      grub-reboot "$entry" ;;
    *) echo "no boot loader with a one-shot entry" >&2; return 1 ;;
  esac
}
"""

# systemd runs, and the boot loader takes a one-shot entry. Prints what is missing, or nothing.
_PROBE = _ONE_SHOT + r"""
[ -d /run/systemd/system ] || { echo "systemd does not run on it"; exit 0; }
[ -z "$(loader)" ] || exit 0
said=$(bootctl is-installed 2>/dev/null || true)
echo "its boot loader is neither systemd-boot (\`bootctl is-installed\` says ${said:-nothing}) nor GRUB with" \
  "NixOS's grub.cfg (grub-reboot, /boot/grub/grub.cfg)"
"""

# Step 1, under the lock (75 when a deployment holds it). Prints `prev P` and `new N`. Whatever fails after the new
# generation was made puts the profile and the boot entries back as they were.
_BOOT_ONCE = _ONE_SHOT + r"""
lock=$1 profile=$2 new=$3 mark=$4 token=$5
exec 9>>"$lock" || exit 1
flock -n 9 || exit 75
name=${profile##*/}
number() { l=$(readlink -- "$1") && l=${l##*/} && l=${l#"$name"-} && printf '%s' "${l%-link}"; }
prev=$(number "$profile") || { echo "$profile has no generation to return to" >&2; exit 1; }
nix-env -p "$profile" --set "$new" || exit 1
gen=$(number "$profile")
undo() {
  nix-env -p "$profile" --switch-generation "$prev" >/dev/null 2>&1
  nix-env -p "$profile" --delete-generations "$gen" >/dev/null 2>&1
  "$profile/bin/switch-to-configuration" boot >/dev/null 2>&1
  rm -f "$mark"
}
{ nix-env -p "$profile" --switch-generation "$prev" && "$profile/bin/switch-to-configuration" boot >&2 \
  && printf '%s %s\n' "$token" "$gen" > "$mark" && set_oneshot "$gen"; } \
  || { status=$?; undo; exit "$status"; }
printf 'prev %s\nnew %s\n' "$prev" "$gen"
"""

# Step 4, or the failure's cleanup, under the lock: keep the new generation (`keep`: the profile's, and the default
# entry) or drop it (the profile stays at the one before); the boot entries are written again; the mark goes.
_SETTLE = _ONE_SHOT + r"""
lock=$1 profile=$2 gen=$3 mark=$4 verdict=$5
exec 9>>"$lock" || exit 1
flock -w 60 9 || exit 75
if [ "$verdict" = keep ]; then
  nix-env -p "$profile" --switch-generation "$gen" || exit 1
else
  nix-env -p "$profile" --delete-generations "$gen" || exit 1
fi
"$profile/bin/switch-to-configuration" boot >&2 || exit 1
rm -f "$mark"
# A deployment cancelled before its reboot: the one-shot entry goes too (an empty entry removes it).
[ "$verdict" != drop-forget ] || set_oneshot "" || true
"""

# After a boot: its id, what it booted and runs, and the mark.
_READ_BOOT = r"""
printf 'boot %s\n' "$(cat /proc/sys/kernel/random/boot_id)"
printf 'booted %s\n' "$(readlink -e /run/booted-system 2>/dev/null)"
printf 'current %s\n' "$(readlink -e /run/current-system 2>/dev/null)"
printf 'mark %s\n' "$(cat -- "$1" 2>/dev/null)"
"""


@dataclass(frozen=True)
class Boot:
    """What a host says of its boot."""

    boot_id: str
    booted: str | None
    current: str | None
    mark: str


def _facts(text: str) -> dict[str, str]:
    facts: dict[str, str] = {}
    for line in text.splitlines():
        label, _, value = line.partition(" ")
        facts.setdefault(label, value.strip())
    return facts


async def read_boot(target: Target, mark: str) -> Boot:
    res = await target.run(["sh", "-c", _READ_BOOT, "sh", mark], timeout=30)
    facts = _facts(res.stdout)
    return Boot(facts.get("boot", ""), facts.get("booted") or None, facts.get("current") or None,
                facts.get("mark", ""))


async def needs_reboot(target: Target, store_path: str) -> bool:
    """reboot: ifNeeded: whether the new system's kernel, initrd or modules differ from those the host booted."""
    res = await target.run(["sh", "-c", _NEEDS_REBOOT, "sh", store_path, *BOOT_FILES], timeout=30)
    return res.stdout.strip() != "no"


def reboot_mark(profile: str) -> str:
    """The file beside the profile that holds this deployment's token and the generation booted once."""
    return os.path.join(os.path.dirname(profile), f".{os.path.basename(profile)}.pulumi-nixos.reboot")


@dataclass
class RebootDeployment:
    """Steps 1 to 4 of the module's docstring, for one host whose closure is already in its store."""

    req: DeployRequest
    target: Target
    connect: Connect  # a new connection with the pinned host key
    status: StatusFn
    output: StatusFn
    prev: Generation | None = None
    new: Generation | None = None
    unsettled: Target | None = None  # the host in a new boot that has not settled, or takes no new connection
    unsettled_why: str = ""

    @property
    def _profile(self) -> str:
        return self.req.profile.path

    async def run(self) -> Target:
        """Boot the new system once and keep it; the target connected to the host that runs it. Raises DeployError
        saying what the host runs (or will run) when it does not."""
        req = self.req
        missing = (await self.target.run(["sh", "-c", _PROBE], timeout=30)).stdout.strip()
        if missing:
            raise EngineError(f"cannot reboot {req.remote.target} into {req.store_path} with a way back: {missing}; "
                              "a one-shot boot entry needs systemd-boot or GRUB. Nothing was changed (set `reboot: never`, "
                              "and reboot by hand when `needsReboot` says so)")
        before = await read_boot(self.target, reboot_mark(self._profile))
        token = secrets.token_hex(16)
        self.status(f"registering {req.store_path} as a generation to boot once")
        await self._boot_once(token)
        assert self.prev is not None and self.new is not None
        self.status(f"rebooting {req.remote.target} into generation {self.new.number} (once)")
        try:
            with contextlib.suppress(EngineError):  # the connection may drop before the answer
                await self.target.run(["systemctl", "--no-block", "reboot"], timeout=30)
        except asyncio.CancelledError:
            # Cancelled before the host went down: no boot of it may come later, unasked.
            with contextlib.suppress(EngineError):
                await asyncio.shield(self._settle("drop", forget_oneshot=True))
            raise
        boot = await self._back(before.boot_id, time.monotonic() + req.reboot_timeout)
        if boot is None and self.unsettled is not None:
            # It answers, but its boot never finished (a hung boot), or the booted system takes no new SSH
            # connection: back to the default entry, deliberately, over the connection that still works.
            _drop(self.target)
            self.target, self.unsettled = self.unsettled, None
            await self._settle("drop")
            self.status(f"{self.unsettled_why}: rebooting into generation {self.prev.number}")
            raise await self._reboot_back(f"{req.remote.target} came back, but {self.unsettled_why} within "
                                          f"{req.reboot_timeout:.0f} s")
        if boot is None:
            raise DeployError(
                f"{req.remote.target} did not come back within {req.reboot_timeout:.0f} s of rebooting into "
                f"{req.store_path} (generation {self.new.number}). That entry was a one-shot: the next boot, or a "
                f"power cycle, brings the host back on generation {self.prev.number} ({self.prev.store_path}), its "
                "default entry. Run `pulumi refresh` once it answers",
                phase="reboot", now_running=self.prev.store_path, generation=self.prev.number)
        if boot.mark.split(" ")[0] != token:
            raise DeployError(
                f"{req.remote.target} came back from the reboot without this deployment's mark ({reboot_mark(self._profile)}): "
                f"another deployment changed it meanwhile. It booted {boot.booted}; run `pulumi refresh`",
                phase="reboot", now_running=boot.current)
        if boot.booted != req.store_path:
            await self._settle("drop")
            raise DeployError(
                f"{req.remote.target} did not boot {req.store_path} (generation {self.new.number}): it came back on "
                f"{boot.booted}. Generation {self.new.number} was removed; the host runs generation "
                f"{self.prev.number} ({self.prev.store_path}), its default entry",
                phase="reboot", now_running=boot.current, generation=self.prev.number, rolled_back=True)
        self.output(f"booted {req.store_path} (generation {self.new.number})")
        await self._health_checks()
        await self._settle("keep")
        return self.target

    async def _boot_once(self, token: str) -> None:
        res = await self.target.run(["sh", "-c", _BOOT_ONCE, "sh", profiles.deployment_lock(self._profile),
                                     self._profile, self.req.store_path, reboot_mark(self._profile), token],
                                    check=False, timeout=self.req.activation_timeout)
        if res.exit_status == profiles.LOCKED:
            raise HostBusy(f"another deployment of {self._profile} on {self.req.remote.target} is under way")
        facts = _facts(res.stdout)
        if res.exit_status != 0 or not facts.get("prev", "").isdigit() or not facts.get("new", "").isdigit():
            raise EngineError(f"preparing {self.req.remote.target} to boot {self.req.store_path} once failed: "
                              f"{res.stderr.strip()[-600:] or 'no answer'}. The profile and the boot entries are as "
                              "they were")
        prev_link = os.path.join(os.path.dirname(self._profile),
                                 f"{os.path.basename(self._profile)}-{facts['prev']}-link")
        prev_path = (await self.target.run(["readlink", "-e", "--", prev_link], timeout=30)).stdout.strip()
        self.prev = Generation(int(facts["prev"]), prev_path)
        self.new = Generation(int(facts["new"]), self.req.store_path)

    async def _back(self, boot_id: str, deadline: float) -> Boot | None:
        """The host in another boot that has settled, read over a connection made after it settled (the way magic
        rollback confirms: the new system takes new SSH connections); self.target is then that connection. None at
        the deadline, with `self.unsettled` connected to the host when it answered in another boot but never
        settled, or took no new connection once settled (`self.unsettled_why` says which)."""
        self.unsettled = None
        settled = False
        while time.monotonic() < deadline:
            try:
                target = await asyncio.wait_for(self.connect(), max(1.0, deadline - time.monotonic()))
            except (ConnectError, EngineError, TimeoutError):
                await asyncio.sleep(POLL_SECONDS)
                continue
            try:
                boot = await read_boot(target, reboot_mark(self._profile))
                if boot.boot_id == boot_id:
                    _drop(target)
                    await asyncio.sleep(POLL_SECONDS)  # not down yet
                    continue
                if settled:
                    for old in {id(t): t for t in (self.target, self.unsettled) if t is not None}.values():
                        _drop(old)
                    self.target, self.unsettled = target, None
                    return boot
                self.status("waiting for the host to finish booting")
                state = await target.run(
                    ["sh", "-c", "systemctl is-system-running --wait >/dev/null 2>&1; systemctl is-system-running"],
                    check=False, timeout=max(1.0, deadline - time.monotonic()))
                settled = state.stdout.strip() in ("running", "degraded")
            except EngineError:
                pass
            if self.unsettled is not None and self.unsettled is not target:
                _drop(self.unsettled)
            # In another boot: not settled (yet), or settled but not asked again over a new connection (yet).
            self.unsettled = target
            self.unsettled_why = ("it booted, but took no new SSH connection afterwards" if settled
                                  else "its boot did not finish")
        return None

    async def _health_checks(self) -> None:
        """On the new boot: a failure reboots into the default entry (unless autoRollback is off)."""
        req = self.req
        assert self.prev is not None and self.new is not None
        if not req.health_checks:
            return
        try:
            await run_health_checks(self.target, req.health_checks, status=self.status)
        except EngineError as e:
            if not req.auto_rollback:
                await self._settle("keep")
                raise DeployError(f"{e}; autoRollback is off, so {req.store_path} stays: it runs, and is the default "
                                  "boot entry now", phase="health-check", now_running=req.store_path,
                                  generation=self.new.number) from e
            await self._settle("drop")
            self.status(f"health check failed: rebooting into generation {self.prev.number}")
            raise await self._reboot_back(str(e)) from e

    async def _reboot_back(self, why: str) -> DeployError:
        """Reboot into the default entry (the generation before), and say what runs then."""
        req = self.req
        assert self.prev is not None and self.new is not None
        first = (f"{why} after rebooting into {req.store_path} (generation {self.new.number}); generation "
                 f"{self.new.number} was removed")
        try:
            before = await read_boot(self.target, reboot_mark(self._profile))
            with contextlib.suppress(EngineError):
                await self.target.run(["systemctl", "--no-block", "reboot"], timeout=30)
        except EngineError as e:
            return DeployError(f"{first}, but rebooting into generation {self.prev.number} failed: {e}. It runs "
                               f"{req.store_path} until its next boot, which boots generation {self.prev.number}",
                               phase="health-check", now_running=req.store_path, generation=self.new.number)
        boot = await self._back(before.boot_id, time.monotonic() + req.reboot_timeout)
        if boot is None:
            return DeployError(f"{first}, and the host did not come back within {req.reboot_timeout:.0f} s of "
                               f"rebooting into generation {self.prev.number} ({self.prev.store_path}), its default "
                               "entry. Run `pulumi refresh` once it answers", phase="health-check",
                               now_running=self.prev.store_path, generation=self.prev.number, rolled_back=True)
        return DeployError(f"{first}. Rebooted: the host runs generation {self.prev.number} ({boot.current})",
                           phase="health-check", now_running=boot.current, generation=self.prev.number,
                           rolled_back=True)

    async def _settle(self, verdict: str, *, forget_oneshot: bool = False) -> None:
        assert self.new is not None
        if forget_oneshot:
            verdict += "-forget"
        res = await self.target.run(["sh", "-c", _SETTLE, "sh", profiles.deployment_lock(self._profile),
                                     self._profile, str(self.new.number), reboot_mark(self._profile), verdict],
                                    check=False, timeout=self.req.activation_timeout)
        if res.exit_status != 0:
            what = "making it the default boot entry" if verdict == "keep" else "removing it"
            raise DeployError(f"{self.req.store_path} (generation {self.new.number}) booted on "
                              f"{self.req.remote.target}, but {what} failed: {res.stderr.strip()[-400:]}. Run "
                              "`pulumi refresh` to see what the host boots", phase="reboot",
                              now_running=self.req.store_path if verdict == "keep" else None)


def _drop(target: Target) -> None:
    """Let go of a connection nobody uses any more (it may hang on a host going down)."""
    target.conn.abort()
