{
  description = "pulumi-nixos lab: NixOS-shaped systems built without nixpkgs";

  outputs = { self }:
    let
      lab = import ./lib.nix;
      web = { version ? "1", nginx ? "1.24.0", extra ? [ ], faults ? { }, service ? { }, kernel ? "6.6.30",
              bootLoader ? "systemd-boot" }:
        lab.nixosConfiguration {
          hostName = "web";
          inherit version faults service kernel bootLoader;
          # disko's LUKS key: nixos-anywhere uploads it (--disk-encryption-keys).
          diskKeyFiles = [ "/tmp/disk.key" ];
          packages = [
            { name = "nginx"; version = nginx; size = 65536; }
            { name = "openssl"; version = "3.0.13"; size = 131072; }
            { name = "lab-tools"; size = 2048; }
          ] ++ extra;
        };
    in
    {
      lib = lab;
      nixosConfigurations = {
        # The system a fresh lab host boots (generation 1).
        base = lab.nixosConfiguration { hostName = "base"; version = "0"; packages = [ { name = "coreutils"; version = "9.4"; size = 4096; } ]; };
        web = web { };
        # One package bumped: nginx 1.24.0 -> 1.26.1.
        web-v2 = web { version = "2"; nginx = "1.26.1"; };
        # A package added.
        web-v3 = web { version = "3"; nginx = "1.26.1"; extra = [ { name = "redis"; version = "7.2.4"; size = 32768; } ]; };
        # A new kernel (and so initrd and modules): runs fully only after a reboot.
        web-kernel = web { version = "kernel"; nginx = "1.26.1"; kernel = "6.6.31"; };
        # Faults.
        web-activation-fails = web { version = "fail"; faults.activationFails = true; };
        web-moves-ssh = web { version = "moved"; faults.sshPort = 2299; };
        web-http-500 = web { version = "500"; faults.httpStatus = 500; };
        web-http-down = web { version = "down"; faults.httpDown = true; };
        # GRUB as the boot loader (grub-reboot, grub.cfg as NixOS writes it).
        web-grub = web { version = "grub"; bootLoader = "grub"; };
        web-grub-kernel = web { version = "grub-kernel"; kernel = "6.6.31"; bootLoader = "grub"; };
        web-grub-500 = web { version = "grub-500"; kernel = "6.6.32"; bootLoader = "grub"; faults.httpStatus = 500; };
        web-slow = web { version = "slow"; faults.slowActivation = 20; };
      };
      packages.x86_64-linux = {
        app-v1 = lab.mkPackage { name = "app"; version = "1.0.0"; size = 8192; };
        app-v2 = lab.mkPackage { name = "app"; version = "2.0.0"; size = 8192; };
      };
    };
}
