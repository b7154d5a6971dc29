import * as pulumi from "@pulumi/pulumi";
import * as hcloud from "@pulumi/hcloud";
import * as tls from "@pulumi/tls";
import * as nixos from "@pulumi-nixos/nixos";

const config = new pulumi.Config();
const location = config.get("location") ?? "fsn1";
const serverType = config.get("serverType") ?? "cx22";
const flake = config.get("flake") ?? ".#web";
// The LUKS passphrase of the encrypted data partition (see flake.nix). disko reads it from /tmp/secret.key on the
// installer; it never reaches the installed system.
const diskPassword = config.requireSecret("diskPassword");

// The key the provider (and nixos-anywhere) log in with. Its private half is a secret in the stack's state.
const deployKey = new tls.PrivateKey("deploy-key", { algorithm: "ED25519" });

// The SSH host key of the installed system, generated here rather than on the machine, so it is known before the
// machine exists. It is placed on the new system through `install.extraFiles`; the provider derives the public key
// from it and pins that once the installed system has booted.
const hostKeyPair = new tls.PrivateKey("host-key", { algorithm: "ED25519" });

const sshKey = new hcloud.SshKey("deploy", { publicKey: deployKey.publicKeyOpenssh });

// Any Linux image that lets root log in with the deploy key will do: nixos-anywhere kexecs into a NixOS installer
// from it and then replaces the whole disk.
const server = new hcloud.Server("web", {
    serverType,
    image: "ubuntu-24.04",
    location,
    sshKeys: [sshKey.id],
});

const machine = new nixos.NixosMachine("web", {
    connection: {
        host: server.ipv4Address,
        user: "root",
        privateKey: deployKey.privateKeyOpenssh,
        // No hostKey: the VM's first host key (Ubuntu's) is replaced twice, by the installer's and then by
        // `hostKeyPair` above, which is the one the provider pins after the install.
        // A VM that has just been created needs a little while before its sshd answers.
        connectTimeout: 30,
        retries: 10,
    },
    flake,
    install: {
        // phases: all four (kexec, disko, install, reboot) when unset.
        // command: nixos-anywhere from PATH unless set, e.g. ["nix", "run", "<flake ref of nixos-anywhere>", "--"].
        extraFiles: {
            "/etc/ssh/ssh_host_ed25519_key": hostKeyPair.privateKeyOpenssh,
            "/etc/ssh/ssh_host_ed25519_key.pub": hostKeyPair.publicKeyOpenssh,
            // The installed system's own authorized key for root, so later deployments can log in (flake.nix keeps
            // services.openssh.authorizedKeysInHomedir on).
            "/root/.ssh/authorized_keys": deployKey.publicKeyOpenssh,
        },
        diskEncryptionKeys: { "/tmp/secret.key": diskPassword },
    },
    healthChecks: [{ http: "http://127.0.0.1/", retries: 5 }],
    // Destroying the stack deletes the VM, and the machine with it: rolling the machine back to its baseline first
    // would be wasted work (and SSH connections) on a disk that is deleted right after.
    onDestroy: "retain",
}, {
    // When a change replaces the VM (a new location, say), the new VM is an empty machine: replace this resource too,
    // so that NixOS is installed onto it again.
    replaceWith: [server],
});

export const ipv4 = server.ipv4Address;
export const systemPath = machine.systemPath;
export const generation = machine.generation;
// The host key pinned in state: after the install, the public half of hostKeyPair.
export const hostKey = machine.hostKey;
// For your own ~/.ssh/known_hosts, and the deploy key to log in with (`pulumi stack output --show-secrets`).
export const knownHostsLine = pulumi.interpolate`${server.ipv4Address} ${hostKey}`;
export const deployPrivateKey = deployKey.privateKeyOpenssh;
