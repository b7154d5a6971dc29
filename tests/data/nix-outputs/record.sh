#!/usr/bin/env bash
# Records what this machine's Nix prints for the commands the engine parses,
# into tests/data/nix-outputs/<version>/. Run once per release:
#   for r in bookworm trixie sid; do bash scripts/in-release.sh $r bash tests/data/nix-outputs/record.sh; done
# Store paths differ per run; the unit tests read shapes, not hashes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export NIX_CONFIG="build-users-group =
sandbox = false
substituters =
flake-registry =
experimental-features = nix-command flakes"
version="$(nix --version | awk '{print $NF}')"
out="$here/$version"
rm -rf "$out"; mkdir -p "$out"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
record() { # record NAME CMD...: stdout, stderr and exit status
  local name=$1; shift
  set +e; "$@" >"$out/$name.stdout" 2>"$out/$name.stderr"; echo $? >"$out/$name.status"; set -e
}
# A flake outside any git repository: a path flake.
mkdir -p "$work/plain"
cat > "$work/plain/flake.nix" <<'NIX'
{
  outputs = { self }: let
    dep = derivation { name = "dep-1.0"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo dep > $out" ]; };
  in {
    packages.x86_64-linux.top = derivation {
      name = "top-2.0"; system = "x86_64-linux"; builder = "/bin/sh";
      inherit dep; args = [ "-c" "echo $dep > $out" ];
    };
  };
}
NIX
record version nix --version
record build nix build --no-link --json "path:$work/plain#packages.x86_64-linux.top"
top="$(nix build --no-link --json "path:$work/plain#packages.x86_64-linux.top" | sed -n 's/.*"out":"\([^"]*\)".*/\1/p')"
record eval-raw nix eval --raw "path:$work/plain#packages.x86_64-linux.top.outPath"
record eval-json nix eval --json "path:$work/plain#packages.x86_64-linux.top.outPath"
record path-info-json nix path-info --json -r "$top"
record path-info-json-format-1 nix path-info --json --json-format 1 -r "$top"
record path-info-json-format-2 nix path-info --json --json-format 2 -r "$top"
record path-info-invalid nix path-info --json /nix/store/00000000000000000000000000000000-missing
record store-qR nix-store -qR "$top"
record check-validity-invalid nix-store --check-validity --print-invalid "$top" /nix/store/00000000000000000000000000000000-missing
# Generations.
record env-set nix-env -p "$work/profile" --set "$top"
dep="$(nix-store -qR "$top" | grep dep-1.0)"
record env-set-2 nix-env -p "$work/profile" --set "$dep"
record list-generations nix-env -p "$work/profile" --list-generations
record list-generations-missing nix-env -p "$work/no-such-profile" --list-generations
# The same flake inside a git repository, with an untracked file it imports.
cp -r "$work/plain" "$work/git"
git -C "$work/git" init -q && git -C "$work/git" add flake.nix
git -C "$work/git" -c user.email=lab@example.invalid -c user.name=lab commit -qm init
echo '"untracked"' > "$work/git/extra.nix"
record git-eval nix eval --raw "$work/git#packages.x86_64-linux.top.outPath"
record git-eval-untracked nix eval --raw --impure --expr "import $work/git/extra.nix"
sed -i 's/outputs = { self }: let/outputs = { self }: let x = import .\/extra.nix;/; s/name = \"top-2.0\"/name = \"top-\${x}\"/' "$work/git/flake.nix"
record git-eval-uses-untracked nix eval --raw "$work/git#packages.x86_64-linux.top.outPath"
record path-eval-uses-untracked nix eval --raw "path:$work/git#packages.x86_64-linux.top.outPath"
# Paths printed in recordings name this run's temporary directory; make them stable.
sed -i "s|$work|/tmp/WORK|g" "$out"/*
echo "recorded Nix $version into $out"
# Uploads to a signed binary cache: the paths copied, then nothing the second time.
nix-store --generate-binary-cache-key record-1 "$work/cache.secret" "$work/cache.public"
record copy-to-cache nix copy --to "file://$work/cache?secret-key=$work/cache.secret" "$top"
record copy-to-cache-again nix copy --to "file://$work/cache?secret-key=$work/cache.secret" "$top"
# keepGenerations and collectGarbage: a generation deleted, then the garbage collector and its summary line.
record delete-generations nix-env -p "$work/profile" --delete-generations 1
record list-generations-after-delete nix-env -p "$work/profile" --list-generations
record gc nix-store --gc
