"""Promote one release from staging to production, as a CI job does, with Pulumi's Automation API.

    python promote.py RELEASE [--staging STACK] [--production STACK]

1. `pulumi up` of the staging stack at RELEASE;
2. a smoke check of what staging now serves: the URL in its `url` output must answer HTTP 200;
3. only then `pulumi up` of the production stack at the same RELEASE, and a check that production runs the very
   system staging was checked on.

It stops at the first step that fails, says why and what production runs, and exits 1; production is not
touched before staging has passed.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path

from pulumi import automation as auto

PROJECT = Path(__file__).resolve().parent


class PromotionStopped(Exception):
    """A step failed: production keeps what it ran before."""


def deploy(stack: auto.Stack, release: str) -> dict[str, object]:
    """`pulumi up` of one stack at RELEASE; its outputs."""
    stack.set_config("release", auto.ConfigValue(release))
    printed: list[str] = []

    def show(line: str) -> None:
        print(line)
        printed.append(line.strip())

    try:
        stack.up(on_output=show, color="never")
    except auto.CommandError as error:
        # The engine's "error:" lines say what failed and what the machine runs now (the whole output was shown).
        errors = list(dict.fromkeys(line for line in printed if line.startswith("error:")))
        raise PromotionStopped(f"`pulumi up` of {stack.name} at {release} failed:\n" + "\n".join(errors)) from error
    return {name: output.value for name, output in stack.outputs().items()}


def smoke_check(stack_name: str, outputs: dict[str, object]) -> None:
    url = str(outputs["url"])
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError as error:
        raise PromotionStopped(f"{stack_name} failed its smoke check: {url} did not answer ({error})") from error
    if status != 200:
        raise PromotionStopped(f"{stack_name} failed its smoke check: {url} answered HTTP {status}")
    print(f"smoke check: {url} answered HTTP 200")


def running(stack: auto.Stack) -> str:
    outputs = stack.outputs()
    return f"{outputs['release'].value} ({outputs['systemPath'].value})" if "systemPath" in outputs else "nothing yet"


def promote(release: str, staging_name: str, production_name: str) -> None:
    staging = auto.select_stack(stack_name=staging_name, work_dir=str(PROJECT))
    production = auto.select_stack(stack_name=production_name, work_dir=str(PROJECT))
    try:
        staged = deploy(staging, release)
        smoke_check(staging_name, staged)
    except PromotionStopped as stopped:
        raise PromotionStopped(f"{stopped}\n{production_name} was not touched: it runs {running(production)}") from None
    promoted = deploy(production, release)
    if promoted["systemPath"] != staged["systemPath"]:
        raise PromotionStopped(f"{production_name} runs {promoted['systemPath']}, not the system {staging_name} "
                               f"was checked on ({staged['systemPath']}): did the flake change in between?")
    print(f"promoted {release}: {staging_name} and {production_name} run {promoted['systemPath']}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Promote a release from staging to production.")
    parser.add_argument("release", help="the flake's nixosConfigurations.<release>")
    parser.add_argument("--staging", default="staging", help="the stack tried first (default: staging)")
    parser.add_argument("--production", default="production", help="the stack promoted to (default: production)")
    args = parser.parse_args()
    try:
        promote(args.release, args.staging, args.production)
    except PromotionStopped as stopped:
        print(f"promotion stopped: {stopped}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
