"""Health checks, run on the target after confirmation: a command, an HTTP URL, a TCP port."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..errors import ConnectError, EngineError
from ..models import HealthCheck
from ..transport.process import Target

# Fetch a URL from the target itself: curl when the system has it, else bash's
# /dev/tcp for plain http (NixOS's /bin/sh is bash). Prints the status code.
_HTTP_PROBE = r'''
url=$1 t=$2
if command -v curl >/dev/null 2>&1; then
  exec curl -s -o /dev/null -w '%{http_code}' --max-time "$t" -- "$url"
fi
case $url in http://*) ;; *) echo "no curl on the target to fetch $url" >&2; exit 3 ;; esac
rest=${url#http://}; hostport=${rest%%/*}; path=/${rest#*/}; [ "$rest" = "$hostport" ] && path=/
host=${hostport%%:*}; port=${hostport##*:}; [ "$port" = "$hostport" ] && port=80
exec timeout "$t" bash -c '
  exec 3<>/dev/tcp/$0/$1 || exit 7
  printf "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$2" "$0" >&3
  read -r _ code _ <&3; printf %s "$code"' "$host" "$port" "$path"
'''

# Host and port reach the inner bash as its own arguments ($0, $1), never as
# part of its script: a hostile `host` can only name a file that does not open.
_TCP_PROBE = 'exec timeout "$3" bash -c \'exec 3<>"/dev/tcp/$0/$1"\' "$1" "$2"'


async def run_check(target: Target, check: HealthCheck) -> str | None:
    """One attempt. None when healthy, else why not."""
    t = str(max(1, int(check.timeout)))
    try:
        if check.command is not None:
            res = await target.run(["timeout", t, "sh", "-c", check.command], check=False, timeout=check.timeout + 10)
            if res.exit_status == 0:
                return None
            detail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or [""]
            return f"exit status {res.exit_status}{': ' + detail[0] if detail[0] else ''}"
        if check.http is not None:
            res = await target.run(["sh", "-c", _HTTP_PROBE, "sh", check.http, t], check=False, timeout=check.timeout + 10)
            code = res.stdout.strip()
            if res.exit_status == 0 and code.isdigit() and 200 <= int(code) < 300:
                return None
            if code.isdigit() and code != "000":
                return f"HTTP status {code}"
            return "no answer" + (f" ({res.stderr.strip()})" if res.stderr.strip() else "")
        if check.tcp is not None:
            res = await target.run(["sh", "-c", _TCP_PROBE, "sh", check.host, str(check.tcp), t], check=False,
                                   timeout=check.timeout + 10)
            return None if res.exit_status == 0 else "connection refused or timed out"
    except ConnectError as e:
        return str(e)
    raise EngineError("a health check needs one of `command`, `http` or `tcp`")


async def run_health_checks(target: Target, checks: tuple[HealthCheck, ...],
                            status: Callable[[str], None] | None = None) -> None:
    """Run every check with its retries; raise EngineError naming the first that stays unhealthy."""
    for check in checks:
        last: str | None = None
        for attempt in range(check.retries + 1):
            if status:
                status(f"health check {check.label} (attempt {attempt + 1}/{check.retries + 1})")
            last = await run_check(target, check)
            if last is None:
                break
            if attempt < check.retries:
                await asyncio.sleep(check.interval)
        if last is not None:
            raise EngineError(f"health check {check.label} failed after {check.retries + 1} attempts: {last}")
