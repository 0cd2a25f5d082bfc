# One NixOS module per ZTNA daemon, built from the shared unit data in ../lib/units.nix.
# intermediate.nix, connector.nix and agent.nix call this with the role and its typed settings.
{ role
, description
, settingsOptions
, extraOptions ? _: { }
, assertions ? _: [ ]
, extraConfig ? _: { }
,
}:
{ config
, lib
, pkgs
, ...
}:
let
  cfg = config.services.ztna.${role};
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    types
    ;
  units = import ../lib/units.nix;
  settingsFormat = pkgs.formats.toml { };
  name = "ztna-${role}";

  # TOML has no null: unset optional keys (e.g. a service's `udp`) are left out.
  dropNulls =
    v:
    if builtins.isAttrs v then
      lib.mapAttrs (_: dropNulls) (lib.filterAttrs (_: x: x != null) v)
    else if builtins.isList v then
      map dropNulls v
    else
      v;

  # The credentials are referred to by name; the daemon finds them in $CREDENTIALS_DIRECTORY.
  finalSettings = lib.recursiveUpdate (dropNulls cfg.settings) {
    tls = {
      ca = units.credentialNames.ca;
      cert = units.credentialNames.cert;
      key = units.credentialNames.key;
    };
  };
  rawConfig = settingsFormat.generate "${name}.toml" finalSettings;
  # Validated at build time: unknown keys and bad values fail the system build, not the service.
  configFile =
    pkgs.runCommand "${name}-config-checked.toml" { nativeBuildInputs = [ cfg.package ]; }
      ''
        ${name} --config ${rawConfig} --check-config --config-only
        ln -s ${rawConfig} $out
      '';

  secretPath =
    what:
    mkOption {
      type = types.str;
      example = "/run/keys/ztna/${what}.pem";
      description = ''
        Absolute path of the ${what} (PEM), read by systemd and passed with `LoadCredential=`.
        Give a string, not a Nix path: a path literal would copy the file into the world-readable
        Nix store.
      '';
    };
in
{
  options.services.ztna.${role} = {
    enable = mkEnableOption description;

    package = mkOption {
      type = types.package;
      description = "The package providing `bin/${name}`.";
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = settingsOptions { inherit lib cfg; };
      };
      default = { };
      description = ''
        Configuration of ${name} (design §5 of the ZTNA docs), rendered to TOML. The `[tls]`
        section is filled in from `caFile`, `certFile` and `keyFile`.
      '';
    };

    caFile = secretPath "deployment CA certificate";
    certFile = secretPath "certificate chain";
    keyFile = secretPath "private key";

    drainTimeout = mkOption {
      type = types.ints.positive;
      default = 30;
      description = "Seconds running flows may take to finish on stop (`drain_timeout`).";
    };

    watchdogSec = mkOption {
      type = types.ints.unsigned;
      default = 30;
      description = "systemd watchdog interval; the daemon pings at half of it while healthy. 0 disables.";
    };
  } // extraOptions { inherit lib cfg; };

  config = mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = !(lib.hasPrefix builtins.storeDir cfg.keyFile);
            message = "services.ztna.${role}.keyFile is in the Nix store, which is world-readable; keep keys outside it.";
          }
          {
            assertion = lib.all (p: lib.hasPrefix "/" p) [
              cfg.caFile
              cfg.certFile
              cfg.keyFile
            ];
            message = "services.ztna.${role}: caFile, certFile and keyFile must be absolute paths.";
          }
        ] ++ assertions { inherit lib cfg; };

        # The agent has no drain (it holds no flows for others); the others drain on stop.
        services.ztna.${role}.settings = lib.optionalAttrs (role != "agent") {
          drain_timeout = lib.mkDefault "${toString cfg.drainTimeout}s";
        };

        systemd.services.${name} = units.unit {
          inherit role;
          execStart = "${cfg.package}/bin/${name}";
          inherit configFile;
          credentials = {
            ca = cfg.caFile;
            cert = cfg.certFile;
            key = cfg.keyFile;
          };
          drainTimeoutSec = cfg.drainTimeout;
          inherit (cfg) watchdogSec;
          bindsPrivilegedPort = (extraConfig { inherit lib cfg; }).bindsPrivilegedPort or false;
          killCommand = "${pkgs.coreutils}/bin/kill";
        };
      }
      (builtins.removeAttrs (extraConfig { inherit lib cfg; }) [ "bindsPrivilegedPort" ])
    ]
  );
}
