{
  description = "ZTNA: zero-trust access to private services (QUIC relay, connector, agent)";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
    crane.url = "github:ipetkov/crane";
    deploy-rs = {
      url = "github:serokell/deploy-rs";
      inputs.nixpkgs.follows = "nixpkgs";
    };
    advisory-db = {
      url = "github:rustsec/advisory-db";
      flake = false;
    };
  };

  outputs =
    { self
    , nixpkgs
    , crane
    , deploy-rs
    , advisory-db
    ,
    }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
      daemons = [
        "ztna-intermediate"
        "ztna-connector"
        "ztna-agent"
      ];

      # Everything the build and the tests read: the Cargo workspace plus the monitoring assets the
      # live monitoring test checks.
      sourceFor =
        craneLib:
        lib.fileset.toSource {
          root = ./.;
          fileset = lib.fileset.unions [
            (craneLib.fileset.commonCargoSources ./.)
            ./nixos/monitoring
          ];
        };

      # crane build of the workspace for one package set (native, cross or static).
      mkBuild =
        pkgs:
        let
          craneLib = crane.mkLib pkgs;
          src = sourceFor craneLib;
          commonArgs = {
            inherit src;
            strictDeps = true;
            pname = "ztna";
            inherit (craneLib.crateNameFromCargoToml { cargoToml = ./crates/ztna-node/Cargo.toml; }) version;
          };
          cargoArtifacts = craneLib.buildDepsOnly commonArgs;
          crate =
            name:
            craneLib.buildPackage (
              commonArgs
              // {
                inherit cargoArtifacts;
                pname = name;
                cargoExtraArgs = "-p ${name}";
                doCheck = false; # the workspace tests run once, in checks.nextest
                meta.mainProgram = name;
              }
            );
        in
        {
          inherit
            craneLib
            src
            commonArgs
            cargoArtifacts
            ;
          packages = lib.genAttrs
            (daemons ++ [
              "ztna-pki"
              "ztna-demo"
            ])
            crate;
        };

      mkImage =
        pkgs: pkg: name: extra:
        pkgs.dockerTools.buildLayeredImage {
          inherit name;
          tag = pkg.version;
          contents = [
            pkg
            pkgs.cacert
          ];
          config = {
            Entrypoint = [ "/bin/${name}" ];
            User = "65534:65534";
          } // extra;
        };
    in
    {
      packages = forAllSystems (
        system: pkgs:
          let
            native = mkBuild pkgs;
            static = mkBuild pkgs.pkgsStatic;
            all = pkgs.symlinkJoin {
              name = "ztna-${native.packages.ztna-intermediate.version}";
              paths = builtins.attrValues native.packages;
            };
          in
          native.packages
          // {
            default = all;
            # Static musl binaries for release artifacts.
            ztna-static = pkgs.symlinkJoin {
              name = "ztna-static";
              paths = builtins.attrValues static.packages;
            };
            ztna-intermediate-image = mkImage pkgs static.packages.ztna-intermediate "ztna-intermediate" {
              ExposedPorts."4433/udp" = { };
            };
            ztna-connector-image = mkImage pkgs static.packages.ztna-connector "ztna-connector" { };
          }
          // lib.optionalAttrs (system == "x86_64-linux") (
            let
              cross = mkBuild pkgs.pkgsCross.aarch64-multiplatform;
            in
            {
              # aarch64-linux binaries cross-built on x86_64-linux (no aarch64 builder needed).
              ztna-aarch64-cross = pkgs.symlinkJoin {
                name = "ztna-aarch64-cross";
                paths = builtins.attrValues cross.packages;
              };
            }
          )
      );

      checks = forAllSystems (
        system: pkgs:
          let
            b = mkBuild pkgs;
            inherit (b) craneLib commonArgs cargoArtifacts;
            nixFiles = lib.fileset.toSource {
              root = ./.;
              fileset = lib.fileset.fileFilter (f: f.hasExt "nix") ./.;
            };
            # deploy-rs checks only for the nodes of this system, so that `nix flake check` on
            # one system never builds the other system's closures.
            ownNodes = lib.filterAttrs
              (
                _: node: node.profiles.system.path.system or system == system
              )
              (self.deploy.nodes or { });
          in
          b.packages
          // {
            clippy = craneLib.cargoClippy (
              commonArgs
              // {
                inherit cargoArtifacts;
                cargoClippyExtraArgs = "--all-targets -- --deny warnings";
              }
            );
            fmt = craneLib.cargoFmt { inherit (b) src; };
            audit = craneLib.cargoAudit {
              inherit (b) src;
              inherit advisory-db;
            };
            nextest = craneLib.cargoNextest (
              commonArgs
              // {
                inherit cargoArtifacts;
                # promtool/prometheus for the metrics and monitoring tests, kill for signal tests.
                nativeCheckInputs = [
                  pkgs.prometheus
                  pkgs.procps
                ];
              }
            );
            nix-format = pkgs.runCommand "ztna-nix-format" { nativeBuildInputs = [ pkgs.nixpkgs-fmt ]; } ''
              nixpkgs-fmt --check ${nixFiles}
              touch $out
            '';
            deadnix = pkgs.runCommand "ztna-deadnix" { nativeBuildInputs = [ pkgs.deadnix ]; } ''
              deadnix --fail ${nixFiles}
              touch $out
            '';
            alert-rules = pkgs.runCommand "ztna-alert-rules" { nativeBuildInputs = [ pkgs.prometheus ]; } ''
              cd ${./nixos/monitoring}
              promtool check rules alerts.yml
              promtool test rules alerts.test.yml
              touch $out
            '';
          }
          // lib.optionalAttrs (system == "x86_64-linux") {
            nixos-e2e = pkgs.testers.runNixOSTest (import ./tests/nixos/e2e.nix { inherit self; });
            nixos-rolling = pkgs.testers.runNixOSTest (import ./tests/nixos/rolling.nix { inherit self; });
          }
          // lib.optionalAttrs (ownNodes != { }) (
            deploy-rs.lib.${system}.deployChecks {
              nodes = ownNodes;
            }
          )
      );

      devShells = forAllSystems (
        system: pkgs:
          let
            # terraform is unfree (BSL) in nixpkgs; allow exactly that one.
            unfree = import nixpkgs {
              inherit system;
              config.allowUnfreePredicate = p: lib.getName p == "terraform";
            };
          in
          {
            default = (mkBuild pkgs).craneLib.devShell {
              checks = self.checks.${system};
              packages = [
                pkgs.cargo-nextest
                pkgs.cargo-audit
                pkgs.prometheus # promtool
                pkgs.nixpkgs-fmt
                pkgs.deadnix
                unfree.terraform
                deploy-rs.packages.${system}.default
              ];
            };
          }
      );

      apps = forAllSystems (
        system: _: {
          demo = {
            type = "app";
            program = lib.getExe self.packages.${system}.ztna-demo;
            meta.description = "The whole ZTNA system on loopback with a throwaway PKI";
          };
        }
      );

      # Hosts come from Terraform: `terraform -chdir=terraform output -json intermediate_public_ips`
      # and `connector_hosts` give deploy/hosts.json (see docs/operations.md); the example file keeps
      # evaluation working before the first apply.
      nixosConfigurations =
        let
          hostsFile = if builtins.pathExists ./deploy/hosts.json then ./deploy/hosts.json else ./deploy/hosts.example.json;
          hosts = builtins.fromJSON (builtins.readFile hostsFile);
          mk =
            modules:
            nixpkgs.lib.nixosSystem {
              inherit (hosts) system;
              modules = [ ./deploy/common.nix ] ++ modules;
            };
        in
        {
          intermediate-blue = mk [
            self.nixosModules.intermediate
            (import ./deploy/intermediate.nix { colour = "blue"; inherit hosts; })
          ];
          intermediate-green = mk [
            self.nixosModules.intermediate
            (import ./deploy/intermediate.nix { colour = "green"; inherit hosts; })
          ];
          connector = mk [
            self.nixosModules.connector
            (import ./deploy/connector.nix { inherit hosts; })
          ];
        };

      # deploy-rs: `deploy .#intermediate-blue`, wait for connectors on 2/2, `deploy .#intermediate-green`.
      # magicRollback reverts if the new system cannot reach back; autoRollback if activation fails
      # (a daemon not becoming ready fails it: Type=notify plus the ztna-*-ready gate).
      deploy.nodes =
        let
          hostsFile = if builtins.pathExists ./deploy/hosts.json then ./deploy/hosts.json else ./deploy/hosts.example.json;
          hosts = builtins.fromJSON (builtins.readFile hostsFile);
          node = name: hostname: {
            inherit hostname;
            sshUser = "root";
            magicRollback = true;
            autoRollback = true;
            profiles.system = {
              user = "root";
              path = deploy-rs.lib.${hosts.system}.activate.nixos self.nixosConfigurations.${name};
            };
          };
        in
        {
          intermediate-blue = node "intermediate-blue" hosts.blue;
          intermediate-green = node "intermediate-green" hosts.green;
          connector = node "connector" hosts.connector;
        };

      nixosModules =
        let
          withPackage =
            role:
            { lib, pkgs, ... }:
            {
              imports = [ ./nixos/modules/${role}.nix ];
              services.ztna.${role}.package =
                lib.mkDefault
                  self.packages.${pkgs.stdenv.hostPlatform.system}."ztna-${role}";
            };
        in
        {
          intermediate = withPackage "intermediate";
          connector = withPackage "connector";
          agent = withPackage "agent";
          monitoring = ./nixos/monitoring/default.nix;
          default = {
            imports = [
              self.nixosModules.intermediate
              self.nixosModules.connector
              self.nixosModules.agent
              self.nixosModules.monitoring
            ];
          };
        };
    };
}
