# The lab's stand-in for nixpkgs' NixOS: real derivations in the NixOS
# toplevel layout, built with nothing but builtins.derivation and the
# machine's /bin/sh (nixpkgs is not reachable here).
#
#   mkSystem { hostName, version, packages, service, faults } -> toplevel
#   mkPackage { name, version, size } -> a package with a name-version path
#   mkDiskoScript { hostName, keyFiles } -> the lab's "disko" script
#
# Everything is a plain function argument with a default, so a test can write
# a new configuration in one line of Nix.
let
  system = "x86_64-linux";

  # A package whose store path is name-version, with a binary that prints its
  # version and `size` bytes of incompressible payload, so pushes have weight.
  mkPackage = { name, version ? null, size ? 1024 }:
    let fullName = if version == null then name else "${name}-${version}";
    in derivation {
      inherit system;
      name = fullName;
      builder = "/bin/sh";
      PATH = "/usr/bin:/bin";
      args = [ "-c" ''
        set -e
        mkdir -p $out/bin $out/share
        printf '#!/bin/sh\necho %s\n' '${fullName}' > $out/bin/${name}
        chmod +x $out/bin/${name}
        head -c ${toString size} /dev/urandom > $out/share/payload
      '' ];
    };

  defaultFaults = {
    activationFails = false; # switch-to-configuration exits non-zero
    sshPort = null;          # activation moves sshd to this port
    httpStatus = 200;        # the lab service answers with this status
    httpDown = false;        # the lab service is not started at all
    slowActivation = 0;      # seconds activation sleeps before finishing
    activationReads = "";    # a file activation reads, as agenix reads its key: missing, activation fails
  };

  # The lab's `bootctl` (systemd-boot's tool), in every system's sw/bin as NixOS has it: the menu is the
  # system profile's generations (/etc/lab/boot-entries, written by switch-to-configuration), the default entry
  # /etc/lab/boot-default, and a one-shot entry (`set-oneshot nixos-generation-N.conf`) is
  # /etc/lab/boot-oneshot, which the next boot uses up (tests/lab/systemd/lab-boot.sh).
  bootctl = builtins.toFile "lab-bootctl" ''
    #!/bin/sh
    set -eu
    case "''${1:-}" in
      is-installed) echo yes ;;
      set-oneshot)
        [ "$#" -ge 2 ] || { echo "bootctl: set-oneshot needs a boot loader entry" >&2; exit 1; }
        if [ -n "$2" ]; then printf '%s\n' "$2" > /etc/lab/boot-oneshot; else rm -f /etc/lab/boot-oneshot; fi ;;
      *) echo "bootctl (lab): ''${1:-} is not supported here" >&2; exit 1 ;;
    esac
  '';

  # GRUB's tools, for a lab system whose boot loader is GRUB (`bootLoader = "grub"`), in its sw/bin as NixOS's grub
  # module puts them: grubenv is GRUB's environment block (a header, `name=value` lines, `#` up to 1024 bytes),
  # `grub-reboot ENTRY` sets next_entry in it, and the boot uses it up (tests/lab/systemd/lab-boot.sh), as NixOS's
  # grub.cfg does. That system's bootctl says systemd-boot is not installed, as bootctl on a GRUB machine does.
  grubEditenv = builtins.toFile "lab-grub-editenv" ''
    #!/bin/sh
    set -eu
    [ "$#" -ge 2 ] || { echo "Usage: grub-editenv FILENAME COMMAND" >&2; exit 1; }
    file=$1 cmd=$2; shift 2
    vars=$(grep -v '^#' "$file" 2>/dev/null || true)
    drop() { printf '%s\n' "$vars" | grep -v "^$1=" || true; }
    case "$cmd" in
      list) printf '%s\n' "$vars" | sed '/^$/d'; exit 0 ;;
      set) for kv in "$@"; do vars="$(drop "''${kv%%=*}")
    $kv"; done ;;
      unset) for k in "$@"; do vars=$(drop "$k"); done ;;
      *) echo "grub-editenv (lab): $cmd is not supported here" >&2; exit 1 ;;
    esac
    mkdir -p "$(dirname "$file")"
    { echo '# GRUB Environment Block'; printf '%s\n' "$vars" | sed '/^$/d'; } > "$file.new"
    head -c $((1024 - $(wc -c < "$file.new"))) /dev/zero | tr '\0' '#' >> "$file.new"
    mv "$file.new" "$file"
  '';
  grubReboot = builtins.toFile "lab-grub-reboot" ''
    #!/bin/sh
    set -eu
    [ "$#" -eq 1 ] || { echo "Usage: grub-reboot [OPTION] MENU_ENTRY" >&2; exit 1; }
    exec "$(dirname "$0")/grub-editenv" /boot/grub/grubenv set "next_entry=$1"
  '';
  grubBootctl = builtins.toFile "lab-bootctl-on-grub" ''
    #!/bin/sh
    case "''${1:-}" in
      is-installed) echo no; exit 1 ;;
      *) echo "bootctl: systemd-boot is not installed" >&2; exit 1 ;;
    esac
  '';

  mkSystem = { hostName ? "lab", version ? "1", packages ? [ ], service ? { }, faults ? { }, kernel ? "6.6.30",
               bootLoader ? "systemd-boot" }:
    let
      f = defaultFaults // faults;
      # The boot files a NixOS toplevel links to: a new kernel, initrd or
      # module set only runs after a reboot.
      linux = mkPackage { name = "linux"; version = kernel; size = 4096; };
      initrd = mkPackage { name = "initrd-linux"; version = kernel; size = 2048; };
      modules = mkPackage { name = "linux-modules"; version = kernel; size = 2048; };
      pkgs = map (p: if builtins.isAttrs p && p ? type then p else mkPackage p) packages;
      serviceJson = builtins.toJSON ({
        inherit version;
        status = f.httpStatus;
        down = f.httpDown;
      } // service);
      sshPort = if f.sshPort == null then "" else toString f.sshPort;
      nixosVersion = "24.05.lab-${version}";
      # Only a GRUB system's derivation has these: every other lab system stays as it was.
      grub = if bootLoader == "grub" then { bootctl = grubBootctl; inherit grubEditenv grubReboot; } else { };
    in derivation ({
      inherit system;
      name = "nixos-system-${hostName}-${nixosVersion}";
      builder = "/bin/sh";
      __structuredAttrs = false;
      stc = ./switch-to-configuration.sh;
      service = ./lab-service.py;
      pkgPaths = pkgs;
      inherit serviceJson sshPort nixosVersion linux initrd modules bootctl;
      PATH = "/usr/bin:/bin";
      activationFails = if f.activationFails then "1" else "";
      slowActivation = toString f.slowActivation;
      activationReads = f.activationReads;
      args = [ "-c" ''
        set -e
        mkdir -p $out/bin $out/sw/bin $out/etc/lab
        echo "$nixosVersion" > $out/nixos-version
        printf 'NAME=NixOS\nID=nixos\nVERSION="%s"\nVERSION_ID="24.05"\nPRETTY_NAME="NixOS %s"\n' \
          "$nixosVersion" "$nixosVersion" > $out/etc/os-release
        printf '%s' "$serviceJson" > $out/etc/lab/service.json
        printf '%s' "$sshPort" > $out/etc/lab/ssh-port
        printf '%s' "$activationFails" > $out/etc/lab/activation-fails
        printf '%s' "$slowActivation" > $out/etc/lab/slow-activation
        printf '%s' "$activationReads" > $out/etc/lab/activation-reads
        for p in $pkgPaths; do
          echo "$p" >> $out/etc/lab/packages
          for b in $p/bin/*; do ln -s "$b" $out/sw/bin/; done
        done
        touch $out/etc/lab/packages
        # The boot files' store paths written into the builder, as NixOS's toplevel builder has them (a
        # preview predicts a reboot from the derivation alone).
        ln -s ${linux}/share/payload $out/kernel
        ln -s ${initrd}/share/payload $out/initrd
        ln -s ${modules} $out/kernel-modules
        cp $service $out/sw/bin/lab-service
        chmod +x $out/sw/bin/lab-service
        cp $bootctl $out/sw/bin/bootctl
        chmod +x $out/sw/bin/bootctl
        if [ -n "''${grubEditenv:-}" ]; then
          cp $grubEditenv $out/sw/bin/grub-editenv
          cp $grubReboot $out/sw/bin/grub-reboot
          chmod +x $out/sw/bin/grub-editenv $out/sw/bin/grub-reboot
          echo grub > $out/etc/lab/boot-loader
        fi
        sed "s|@out@|$out|g" $stc > $out/bin/switch-to-configuration
        chmod +x $out/bin/switch-to-configuration
      '' ];
    } // grub);

  # What disko's script does to a lab host, run there by nixos-anywhere in the
  # installer: check that the LUKS key files it needs arrived (present, mode
  # 0600), then "format the disk": a fresh disk has no host keys and no boot
  # entry, so nothing of the old system survives into the installed one.
  mkDiskoScript = { hostName ? "lab", keyFiles ? [ ] }: derivation {
    inherit system;
    name = "disko-${hostName}";
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    keyFiles = builtins.concatStringsSep " " keyFiles;
    args = [ "-c" ''
      set -e
      {
        echo '#!/bin/sh'
        echo 'set -eu'
        echo 'export PATH=/usr/sbin:/usr/bin:/sbin:/bin'
        echo "for key in $keyFiles; do"
        echo '  [ -f "$key" ] || { echo "disko: the encryption key $key is missing" >&2; exit 1; }'
        echo '  mode=$(stat -c %a "$key")'
        echo '  [ "$mode" = 600 ] || { echo "disko: the encryption key $key has mode $mode, not 600" >&2; exit 1; }'
        echo '  echo "disko: opened the LUKS volume with $key (mode $mode)"'
        echo 'done'
        echo 'rm -f /etc/ssh/ssh_host_* /etc/lab/boot-default'
        echo 'date -u +%FT%TZ > /etc/lab/disko-formatted'
        echo 'echo "disko: formatted the lab disk"'
      } > $out
      chmod +x $out
    '' ];
  };

  # nixosConfigurations.<name>.config.system.build.{toplevel,diskoScript}, as
  # NixOS with disko's module has them.
  nixosConfiguration = args@{ diskKeyFiles ? [ ], ... }: {
    config.system.build.toplevel = mkSystem (builtins.removeAttrs args [ "diskKeyFiles" ]);
    config.system.build.diskoScript = mkDiskoScript {
      hostName = args.hostName or "lab";
      keyFiles = diskKeyFiles;
    };
  };
in
{
  inherit mkPackage mkSystem mkDiskoScript nixosConfiguration;
}
