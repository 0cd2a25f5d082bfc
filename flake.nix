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

      # Binaries that print their own shell completions and man page
      # (`<bin> completions bash|zsh|fish`, `<bin> man`).
      documented = daemons ++ [ "ztna-pki" ];

      # crane build of the workspace for one package set (native, cross or static).
      mkBuild =
        pkgs:
        let
          craneLib = crane.mkLib pkgs;
          src = sourceFor craneLib;
          # The workspace version: member crates say `version.workspace = true`, which crane does
          # not resolve (it would fall back to its 0.0.1 placeholder).
          inherit (craneLib.crateNameFromCargoToml { cargoToml = ./Cargo.toml; }) version;
          commonArgs = {
            inherit src version;
            strictDeps = true;
            pname = "ztna";
            # crane's default; spelled out because `cargoExtraArgs` below replaces it.
            cargoExtraArgs = "--locked";
          };
          cargoArtifacts = craneLib.buildDepsOnly (
            commonArgs
            // {
              # crane replaces the sources of every crate it finds with dummies before building
              # the dependencies; vendor/quinn-proto and vendor/quinn (patched, vendor/README.md)
              # are dependencies, which would not build as dummies (nor build others against them).
              extraDummyScript = ''
                rm -rf $out/vendor/quinn-proto
                cp -r --no-preserve=mode ${./vendor/quinn-proto} $out/vendor/quinn-proto
                rm -rf $out/vendor/quinn
                cp -r --no-preserve=mode ${./vendor/quinn} $out/vendor/quinn
              '';
            }
          );
          # Generating completions and man pages runs the binary: only where the build platform
          # can execute it (not when cross-compiling).
          docs =
            name:
            lib.optionalString (lib.elem name documented && pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform) ''
              installShellCompletion --cmd ${name} \
                --bash <($out/bin/${name} completions bash) \
                --zsh <($out/bin/${name} completions zsh) \
                --fish <($out/bin/${name} completions fish)
              $out/bin/${name} man > ${name}.1
              installManPage ${name}.1
            '';
          crate =
            name:
            craneLib.buildPackage (
              commonArgs
              // {
                inherit cargoArtifacts;
                pname = name;
                cargoExtraArgs = "--locked -p ${name}";
                doCheck = false; # the workspace tests run once, in checks.nextest
                nativeBuildInputs = [ pkgs.installShellFiles ];
                postInstall = docs name;
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

      # deploy/hosts.json (Terraform's `deploy_hosts` output) or, before the first apply, the example:
      # { blue = { hostname, system }; green = { ... }; connector = { ... } or null; }
      deployHosts = rec {
        file = if builtins.pathExists ./deploy/hosts.json then ./deploy/hosts.json else ./deploy/hosts.example.json;
        hosts = builtins.fromJSON (builtins.readFile file);
        # nixosConfigurations / deploy.nodes name -> its entry in hosts
        byNode = {
          intermediate-blue = hosts.blue;
          intermediate-green = hosts.green;
          connector = hosts.connector;
        };
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
                # The metrics and monitoring tests run promtool (in prometheus' `cli` output) and
                # start a real Prometheus (`out`); kill for the signal tests.
                nativeCheckInputs = [
                  pkgs.prometheus
                  pkgs.prometheus.cli
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
            alert-rules = pkgs.runCommand "ztna-alert-rules" { nativeBuildInputs = [ pkgs.prometheus.cli ]; } ''
              cd ${./nixos/monitoring}
              promtool check rules alerts.yml
              promtool test rules alerts.test.yml
              touch $out
            '';
          }
          // lib.optionalAttrs (system == "x86_64-linux") {
            nixos-e2e = pkgs.testers.runNixOSTest (import ./tests/nixos/e2e.nix { inherit self; });
            nixos-rolling = pkgs.testers.runNixOSTest (import ./tests/nixos/rolling.nix { inherit self; });
            nixos-p2p = pkgs.testers.runNixOSTest (import ./tests/nixos/p2p.nix { inherit self; });
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
                pkgs.prometheus.cli # promtool
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
          # The deploy-rs of flake.lock (its activate-rs is what runs on the hosts):
          # `nix run .#deploy-rs -- .#intermediate-blue`.
          deploy-rs = {
            type = "app";
            program = "${deploy-rs.packages.${system}.deploy-rs}/bin/deploy";
            meta.description = "deploy-rs at the revision pinned in flake.lock";
          };
        }
      );

      # NixOS systems of the deployed hosts, one per host with that host's own Nix system (an
      # arm64 instance type runs aarch64-linux). deploy/hosts.json is Terraform's `deploy_hosts`
      # output (see docs/operations.md); the example file keeps evaluation working before the
      # first apply.
      nixosConfigurations =
        let
          inherit (deployHosts) hosts;
          mk =
            host: modules:
            nixpkgs.lib.nixosSystem {
              modules = [
                { nixpkgs.hostPlatform = host.system; }
                ./deploy/common.nix
              ] ++ modules;
            };
        in
        {
          intermediate-blue = mk hosts.blue [
            self.nixosModules.intermediate
            (import ./deploy/intermediate.nix { colour = "blue"; inherit hosts; })
          ];
          intermediate-green = mk hosts.green [
            self.nixosModules.intermediate
            (import ./deploy/intermediate.nix { colour = "green"; inherit hosts; })
          ];
        }
        // lib.optionalAttrs (hosts.connector != null) {
          connector = mk hosts.connector [
            self.nixosModules.connector
            (import ./deploy/connector.nix { inherit hosts; })
          ];
        };

      # deploy-rs: `deploy .#intermediate-blue`, wait for connectors on 2/2, `deploy .#intermediate-green`.
      # magicRollback reverts if the new system cannot reach back; autoRollback if activation fails
      # (a daemon not becoming ready fails it: Type=notify plus the ztna-*-ready gate).
      deploy.nodes = lib.mapAttrs
        (name: _: {
          inherit (deployHosts.byNode.${name}) hostname;
          sshUser = "root";
          magicRollback = true;
          autoRollback = true;
          profiles.system = {
            user = "root";
            path = deploy-rs.lib.${deployHosts.byNode.${name}.system}.activate.nixos self.nixosConfigurations.${name};
          };
        })
        self.nixosConfigurations;

      # Every exported module has a stable `key`, so importing any combination (e.g. `default`
      # together with `intermediate`) imports each one once.
      nixosModules =
        let
          file = toString ./flake.nix;
          withPackage = role: {
            key = "${file}#nixosModules.${role}";
            _file = "${file}#nixosModules.${role}";
            imports = [
              ./nixos/modules/${role}.nix
              ({ lib, pkgs, ... }:
                let
                  inherit (pkgs.stdenv) buildPlatform hostPlatform;
                  name = "ztna-${role}";
                in
                {
                  services.ztna.${role} = {
                    # Native systems use the flake's package; a cross-built system builds it
                    # with its own (cross) package set.
                    package = lib.mkDefault (
                      if buildPlatform.system == hostPlatform.system
                      then self.packages.${hostPlatform.system}.${name}
                      else (mkBuild pkgs).packages.${name}
                    );
                    # The config is checked at build time by a binary of the build platform.
                    configCheckPackage = lib.mkDefault (self.packages.${buildPlatform.system}.${name} or null);
                  };
                })
            ];
          };
        in
        {
          intermediate = withPackage "intermediate";
          connector = withPackage "connector";
          agent = withPackage "agent";
          monitoring = ./nixos/monitoring/default.nix;
          default = {
            key = "${file}#nixosModules.default";
            _file = "${file}#nixosModules.default";
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
