# Stand-in for pkgs.testers.runNixOSTest (nixos/lib/testing): the test module is evaluated with
# typed `name`, `nodes` and `testScript`, and every node as a NixOS system (with the options of
# the test VMs that the nodes set), so its assertions, types and units are checked as the real
# test build would. The result keeps the evaluated nodes and the test script for the checks.
{ lib, pkgs, nixos }:
test:
let
  inherit (lib) mkOption types;
  t = lib.evalModules {
    modules = [
      {
        options = {
          name = mkOption { type = types.str; };
          nodes = mkOption { type = types.lazyAttrsOf types.deferredModule; };
          testScript = mkOption { type = types.either types.str (types.functionTo types.str); };
        };
        config._module.args.pkgs = pkgs;
      }
      test
    ];
  };
  # nixos/modules/virtualisation/qemu-vm.nix (the options the nodes set)
  vm = {
    options.virtualisation.vlans = mkOption {
      type = types.listOf types.ints.unsigned;
      default = [ 1 ];
    };
  };
  nodes = lib.mapAttrs
    (name: m:
      nixos.nixosSystem {
        modules = [
          vm
          m
          {
            nixpkgs.hostPlatform = pkgs.system;
            networking.hostName = lib.mkDefault name;
          }
        ];
      })
    t.config.nodes;
in
pkgs.mkDrv {
  pname = "vm-test-run-${t.config.name}";
  inherit nodes;
  testScript =
    if builtins.isFunction t.config.testScript
    then t.config.testScript { nodes = lib.mapAttrs (_: n: n.config) nodes; }
    else t.config.testScript;
}
