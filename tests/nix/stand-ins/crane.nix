# Stand-in for crane (ipetkov/crane at the flake.lock revision): `mkLib pkgs` with the functions
# flake.nix calls. crateNameFromCargoToml follows crane's lib/crateNameFromCargoToml.nix and
# internalCrateNameFromCargoToml.nix (package.version if it is a string, else
# workspace.package.version, else the placeholder "0.0.1"), and the builders keep crane's
# defaults (buildPackage, buildDepsOnly and cargoClippy: cargoExtraArgs "--locked";
# cargoNextest: ""), so the checks see the version and flags a real build would use.
{ lib }:
{
  mkLib =
    pkgs:
    let
      firstString = lib.findFirst builtins.isString null;
      crateNameFromCargoToml =
        args:
        let
          toml = builtins.fromTOML (builtins.readFile (args.cargoToml or (args.src + "/Cargo.toml")));
          version = firstString [ (toml.package.version or null) (toml.workspace.package.version or null) ];
          pname = firstString [ (toml.package.metadata.crane.name or null) (toml.package.name or null) (toml.workspace.metadata.crane.name or null) ];
        in
        {
          pname = if pname == null then "cargo-package" else pname;
          version = if version == null then "0.0.1" else version;
        };
      drv =
        defaultExtraArgs: kind: args:
        pkgs.mkDrv (
          args
          // {
            pname = "${args.pname or "ztna"}-${kind}";
            version = args.version or (crateNameFromCargoToml args).version;
            cargoExtraArgs = args.cargoExtraArgs or defaultExtraArgs;
          }
        );
    in
    {
      inherit crateNameFromCargoToml;
      fileset.commonCargoSources =
        root: lib.fileset.fileFilter (f: f.hasExt "rs" || f.hasExt "toml" || f.name == "Cargo.lock") root;
      buildDepsOnly = drv "--locked" "deps";
      buildPackage =
        args:
        pkgs.mkDrv (
          args
          // {
            pname = args.pname or (crateNameFromCargoToml args).pname;
            version = args.version or (crateNameFromCargoToml args).version;
            cargoExtraArgs = args.cargoExtraArgs or "--locked";
            binaries.out = [ (args.meta.mainProgram or args.pname) ];
          }
        );
      cargoClippy = drv "--locked" "clippy";
      cargoFmt = drv "" "fmt";
      cargoAudit = drv "" "audit";
      cargoNextest = drv "" "nextest";
      devShell =
        args:
        pkgs.mkDrv (
          args
          // {
            pname = "ztna-dev-shell";
          }
        );
    };
}
