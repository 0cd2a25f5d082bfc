# Stand-in for deploy-rs (serokell/deploy-rs at the flake.lock revision, flake.nix): per system,
# `lib.activate.nixos base` builds from base.config.system.build.toplevel (so failed assertions
# fail it, as the real one does) and reads base.config.boot.loader.systemd-boot.enable; its
# result is a derivation of that system. `lib.deployChecks` keeps the nodes it checks;
# packages.deploy-rs holds bin/deploy (and bin/activate).
{ lib, mkPkgs }:
let
  systems = [ "x86_64-linux" "aarch64-linux" ];
  forSystem = system:
    let
      pkgs = mkPkgs { inherit system; };
    in
    {
      lib = {
        activate.nixos =
          base:
          let
            toplevel = base.config.system.build.toplevel;
          in
          builtins.seq base.config.boot.loader.systemd-boot.enable (
            pkgs.mkDrv {
              pname = "${toplevel.name}-activate-path";
              inherit toplevel;
            }
          );
        deployChecks =
          deploy:
          lib.mapAttrs (kind: _: pkgs.mkDrv { pname = "deploy-rs-check-${kind}"; inherit (deploy) nodes; }) {
            deploy-schema = null;
            deploy-activate = null;
          };
      };
      packages = rec {
        deploy-rs = pkgs.mkDrv {
          pname = "deploy-rs";
          binaries.out = [ "deploy" "activate" ];
        };
        default = deploy-rs;
      };
    };
  all = lib.genAttrs systems forSystem;
in
{
  lib = lib.mapAttrs (_: s: s.lib) all;
  packages = lib.mapAttrs (_: s: s.packages) all;
}
