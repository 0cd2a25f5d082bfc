# Stand-in for a nixpkgs package set, for evaluation without a binary cache. Only the attributes
# that flake.nix, nixos/, deploy/ and tests/nixos/ use exist (any other `pkgs.<attr>` is an
# evaluation error), each with the outputs and binaries it has in nixpkgs at the pinned revision
# (tests/nix/README.md lists them and the files they were checked against). A package is a
# derivation-shaped attribute set: `outPath` (a store-path-shaped string, or a host path where the
# systemd suite runs the result), one attribute per output, and `binaries` (what bin/ holds).
{ lib
, subset # ../shared/nix/nixos-subset/systemd-subset.nix, for the NixOS tests' nodes
, system # the host platform
, buildSystem ? system
, isStatic ? false
, config ? { }
  # pname -> path: packages the systemd suite takes from the container (e.g. coreutils = "/usr").
, hostPaths ? { }
}:
let
  platform = s: {
    system = s;
    isLinux = lib.hasSuffix "-linux" s;
    isAarch64 = lib.hasPrefix "aarch64-" s;
    isx86_64 = lib.hasPrefix "x86_64-" s;
    inherit isStatic;
    # As in lib.systems: a machine runs binaries of its own CPU and kernel.
    canExecute = other: other.system == s;
  };
  hostPlatform = platform system;
  buildPlatform = platform buildSystem;

  hash = s: builtins.substring 0 32 (builtins.hashString "sha256" s);

  # mkDrv { pname, version?, outputs? = [ "out" ... ], binaries? = { <output> = [ names ]; }, ... }
  # The first output is the default (what "${pkg}" refers to), as in nixpkgs.
  mkDrv =
    { pname
    , version ? "0"
    , outputs ? [ "out" ]
    , binaries ? { }
    , ...
    }@args:
    let
      name = "${pname}-${version}";
      forOutput =
        o:
        builtins.removeAttrs args [ "binaries" ]
        // {
          type = "derivation";
          inherit name pname version outputs system;
          outputName = o;
          outPath =
            hostPaths.${pname} or "/nix/store/${hash "${system}/${name}/${o}"}-${name}${lib.optionalString (o != "out") "-${o}"}";
          binaries = binaries.${o} or [ ];
          meta = args.meta or { };
        }
        // lib.genAttrs outputs forOutput;
    in
    forOutput (builtins.head outputs);

  tool = pname: bins: mkDrv {
    inherit pname;
    binaries.out = bins;
  };

  standInFormats = import ./formats.nix { inherit lib; };

  self = {
    inherit lib mkDrv;
    inherit system;
    stdenv = {
      inherit hostPlatform buildPlatform;
    };
    # The build platform's own package set.
    buildPackages = if buildSystem == system && !isStatic then self else import ./pkgs.nix { inherit lib subset config hostPaths; system = buildSystem; };
    pkgsStatic = import ./pkgs.nix {
      inherit lib subset config hostPaths system buildSystem;
      isStatic = true;
    };
    pkgsCross.aarch64-multiplatform = import ./pkgs.nix {
      inherit lib subset config hostPaths;
      system = "aarch64-linux";
      inherit buildSystem;
    };

    runCommand =
      name: env: buildCommand:
      mkDrv (
        env
        // {
          pname = name;
          inherit buildCommand;
          standIn = "runCommand";
        }
      );
    symlinkJoin =
      { name, paths, ... }@args:
      mkDrv (
        args
        // {
          pname = name;
          binaries.out = lib.concatMap (p: p.binaries or [ ]) paths;
        }
      );
    dockerTools.buildLayeredImage =
      { name, tag, contents, ... }@args:
        assert lib.all lib.isDerivation contents;
        assert builtins.isString tag && tag != "";
        mkDrv (args // { pname = "docker-image-${name}.tar.gz"; });
    testers.runNixOSTest = import ./nixos-test.nix {
      inherit lib;
      pkgs = self;
      nixos = import ./nixos.nix {
        inherit lib subset;
        mkPkgs = args: import ./pkgs.nix ({ inherit lib subset config hostPaths; } // args);
      };
    };

    formats = {
      inherit (standInFormats) toml yaml;
    };

    # Packages: outputs and bin/ as in nixpkgs at the pinned revision (tests/nix/README.md).
    prometheus = mkDrv {
      pname = "prometheus";
      outputs = [ "out" "doc" "cli" ];
      binaries = {
        out = [ "prometheus" ];
        cli = [ "promtool" ];
      };
    };
    coreutils = tool "coreutils" [ "cat" "install" "kill" "mkdir" "mv" "rm" "stat" "touch" ];
    bash = tool "bash" [ "bash" "sh" ];
    findutils = tool "findutils" [ "find" "xargs" ];
    gnugrep = tool "gnugrep" [ "grep" ];
    gnused = tool "gnused" [ "sed" ];
    systemd = tool "systemd" [ "systemctl" "journalctl" ];
    procps = tool "procps" [ "kill" "pkill" "ps" ];
    curl = mkDrv {
      pname = "curl";
      outputs = [ "bin" "dev" "out" "man" "devdoc" ];
      binaries.bin = [ "curl" ];
    };
    socat = tool "socat" [ "socat" ];
    grafana = tool "grafana" [ "grafana" ];
    iproute2 = tool "iproute2" [ "ip" "ss" "nstat" ];
    python3 = tool "python3" [ "python3" ];
    cacert = tool "cacert" [ ];
    installShellFiles = tool "install-shell-files" [ ];
    nixpkgs-fmt = tool "nixpkgs-fmt" [ "nixpkgs-fmt" ];
    deadnix = tool "deadnix" [ "deadnix" ];
    cargo-nextest = tool "cargo-nextest" [ "cargo-nextest" ];
    cargo-audit = tool "cargo-audit" [ "cargo-audit" ];
    terraform =
      let
        drv = mkDrv {
          pname = "terraform";
          binaries.out = [ "terraform" ];
          meta.license = "bsl11";
        };
        allowed = (config.allowUnfree or false) || (config.allowUnfreePredicate or (_: false)) drv;
      in
      if allowed then drv else throw "Package ‘terraform’ has an unfree license (‘bsl11’), refusing to evaluate.";
  };
in
self
