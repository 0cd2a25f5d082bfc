# The flake's own outputs, evaluated with stand-in inputs: `outputs` from flake.nix is called with
# a stand-in nixpkgs (real lib + lib.nixosSystem over the typed NixOS stand-in, stand-in package
# sets), crane, deploy-rs and advisory-db, and `self` is the result (a fixed point, as in Nix).
{ libPath # nixpkgs' lib directory (../shared/nix/nixpkgs-lib/lib)
, subset # ../shared/nix/nixos-subset/systemd-subset.nix
, repo # the repository (flake.nix)
, hostPaths ? { } # pname -> path, see pkgs.nix
}:
let
  lib = import libPath;
  mkPkgs = args: import ./pkgs.nix ({ inherit lib subset hostPaths; } // args);
  nixos = import ./nixos.nix { inherit lib subset mkPkgs; };
  systems = [ "x86_64-linux" "aarch64-linux" ];

  nixpkgs = {
    # `import nixpkgs { system; config; }` (flake.nix does, for the unfree terraform).
    outPath = builtins.toFile "stand-in-nixpkgs.nix" ''
      args: import ${toString ./pkgs.nix} ({ lib = import ${toString libPath}; subset = ${toString subset}; } // args)
    '';
    lib = lib.extend (
      _: prev:
        { inherit (nixos) nixosSystem; }
        # lib.fileset needs builtins.readFileType (Nix >= 2.14); this machine's Nix 2.8 lacks it.
        # Only the source copy is stood in: the file sets stay lazy and are never forced here.
        // lib.optionalAttrs (!(builtins ? readFileType)) {
          fileset = prev.fileset // {
            toSource = { root, ... }: builtins.seq root { outPath = "/nix/store/00000000000000000000000000000000-source"; };
          };
        }
    );
    legacyPackages = lib.genAttrs systems (system: mkPkgs { inherit system; });
  };
  crane = import ./crane.nix { inherit lib; };
  deploy-rs = import ./deploy-rs.nix { inherit lib mkPkgs; };
  advisory-db = "/nix/store/00000000000000000000000000000000-source";

  flake = import (repo + "/flake.nix");
  self = flake.outputs { inherit self nixpkgs crane deploy-rs advisory-db; } // { outPath = toString repo; };
in
{
  inherit lib nixos mkPkgs self systems crane deploy-rs flake;
}
