{
  description = "pulumi-nixos: NixOS machines and Nix profiles as Pulumi resources";

  # Follow your own nixpkgs with `inputs.pulumi-nixos.inputs.nixpkgs.follows = "nixpkgs";`.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      python = pkgs.python3;
      project = (builtins.fromTOML (builtins.readFile ./provider/pyproject.toml)).project;

      # What the provider imports: pulumi (the gRPC protocol's messages), grpc, google.protobuf, google.rpc,
      # asyncssh; and bcrypt, with which asyncssh decrypts passphrase-protected OpenSSH keys.
      # nixpkgs' own versions: the exact pins in pyproject.toml are for pip.
      runtime = ps: [ ps.pulumi ps.grpcio ps.protobuf ps.googleapis-common-protos ps.asyncssh ps.bcrypt ];

      provider = python.pkgs.buildPythonApplication {
        pname = "pulumi-resource-nixos";
        inherit (project) version;
        pyproject = true;
        src = ./provider;
        build-system = [ python.pkgs.setuptools ];
        dependencies = runtime python.pkgs;
        pythonRelaxDeps = true;
        # The engine reads the schema to type-check inputs; the plugin archive sets the same variable.
        makeWrapperArgs = [ "--set-default" "PULUMI_NIXOS_SCHEMA" "${./schema.json}" ];
        meta = {
          inherit (project) description;
          license = pkgs.lib.licenses.asl20;
          mainProgram = "pulumi-resource-nixos";
          platforms = [ system ];
        };
      };
    in
    {
      packages.${system}.default = provider;

      apps.${system}.default = {
        type = "app";
        program = "${provider}/bin/pulumi-resource-nixos";
      };

      devShells.${system}.default = pkgs.mkShell {
        packages = [
          (python.withPackages (ps: runtime ps ++ [
            ps.pytest ps.pytest-asyncio ps.pytest-timeout ps.hypothesis ps.mypy ps.types-protobuf
          ]))
          pkgs.ruff
          pkgs.nix
          pkgs.openssh
          pkgs.zstd
          pkgs.pulumi
        ];
      };
    };
}
