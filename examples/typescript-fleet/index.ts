import * as pulumi from "@pulumi/pulumi";
import * as nixos from "@pulumi-nixos/nixos";

const config = new pulumi.Config();
const hosts = config.requireObject<string[]>("hosts");
const port = config.getNumber("port") ?? 22;
const privateKey = config.requireSecret("privateKey");
const flake = config.get("flake") ?? "../../tests/lab";
const release = config.get("release") ?? "web";

// One machine per host; Pulumi deploys them in parallel.
const machines = hosts.map((host, i) => new nixos.NixosMachine(`web-${i}`, {
    connection: { host, port, privateKey },
    flake: `${flake}#${release}`,
    healthChecks: [{ http: `http://${host}:8080/`, retries: 5 }],
}));

// An application profile owned by `alice` on the first host (deploy-rs style).
const app = new nixos.NixProfile("app", {
    connection: { host: hosts[0], port, privateKey },
    profile: "app",
    user: "alice",
    flake: `${flake}#${config.get("app") ?? "app-v1"}`,
    activate: "echo \"activated $(readlink -f \"$PROFILE\")\"",
}, { dependsOn: machines });

export const systemPaths = machines.map(m => m.systemPath);
export const appStorePath = app.storePath;
export const appGeneration = app.generation;
