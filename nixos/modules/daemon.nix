# One NixOS module per ZTNA daemon, built from the shared unit data in ../lib/units.nix.
# intermediate.nix, connector.nix and agent.nix call this with the role and its typed settings.
{ role
, description
  # Settings a reload (SIGHUP) applies: a switch that changes only these reloads the unit.
, reloadable ? [ ]
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

  # The unit copies the certificates and key to /run/ztna-tls/<role> (as root, at start and
  # before each reload: see ../lib/units.nix); the config names those copies.
  finalSettings = lib.recursiveUpdate (dropNulls cfg.settings) {
    tls = units.tlsFiles role;
  };
  configFile = settingsFormat.generate "${name}.toml" finalSettings;
  # The unit reads its config from /etc, not from the store path: a config switch then changes
  # the unit file only in its triggers, so NixOS can reload it (SIGHUP) instead of restarting it
  # (a drain that ends long flows) when only reloadable settings changed.
  etcConfig = "ztna/${role}.toml";
  restartConfig = settingsFormat.generate "${name}-restart.toml" (builtins.removeAttrs finalSettings reloadable);
  # Validated at build time (unknown keys and bad values fail the system build, not the
  # service), by a binary that runs on the build platform, so cross-built systems build too.
  configCheck =
    pkgs.runCommand "${name}-config-check" { nativeBuildInputs = [ cfg.configCheckPackage ]; }
      ''
        ${name} --config ${configFile} --check-config --config-only
        touch $out
      '';

  # "127.0.0.1:9470" / "[::1]:9470" -> host and port.
  splitAddr =
    addr:
    let
      parts = lib.splitString ":" addr;
    in
    {
      host = lib.concatStringsSep ":" (lib.init parts);
      port = lib.toInt (lib.last parts);
    };
  ops = splitAddr cfg.settings.ops_listen;
  opsIsLoopback = lib.hasPrefix "127." ops.host || ops.host == "[::1]" || ops.host == "localhost";

  secretPath =
    what:
    mkOption {
      type = types.str;
      example = "/run/keys/ztna/${what}.pem";
      description = ''
        Absolute path of the ${what} (PEM), copied by root to /run/ztna-tls/<role> when the
        service starts and before each `systemctl reload` (so a reload applies a re-issued
        file).
        Give a string, not a Nix path: a path literal would copy the file into the world-readable
        Nix store.
      '';
    };
  extra = extraConfig { inherit lib cfg; };
in
{
  options.services.ztna.${role} = {
    enable = mkEnableOption description;

    package = mkOption {
      type = types.package;
      description = "The package providing `bin/${name}`.";
    };

    configCheckPackage = mkOption {
      type = types.nullOr types.package;
      default = if pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform then cfg.package else null;
      defaultText = lib.literalExpression "package, when the build platform can run it; otherwise null";
      description = ''
        A `bin/${name}` that runs on the build platform, used to validate the rendered config at
        build time (`--check-config --config-only`). The flake's modules set it to the package of
        the build platform, so cross-built systems are checked too; null skips the check.
      '';
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = settingsOptions { inherit lib cfg; };
      };
      default = { };
      description = ''
        Configuration of ${name} (the keys of examples/*.toml and README), rendered to TOML. The `[tls]`
        section is filled in from `caFile`, `certFile` and `keyFile`.
      '';
    };

    caFile = secretPath "deployment CA certificate";
    certFile = secretPath "certificate chain";
    keyFile = secretPath "private key";

    drainTimeout = mkOption {
      type = types.ints.positive;
      default = 30;
      description = "Seconds running flows may take to finish on stop (`drain_timeout`); the unit's TimeoutStopSec is 15 s more.";
    };

    watchdogSec = mkOption {
      type = types.ints.unsigned;
      default = 30;
      description = "systemd watchdog interval; the daemon pings at half of it while healthy. 0 disables.";
    };

    limitNOFILE = mkOption {
      type = types.ints.positive;
      default = 65536;
      description = "Open file limit (`LimitNOFILE=`); every UDP flow holds a socket.";
    };

    openOpsFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open the TCP port of `settings.ops_listen` in the firewall, for a Prometheus on another
        host. `ops_listen` must then listen beyond loopback (e.g. `0.0.0.0:9470`).
      '';
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
          {
            # They are copied by a shell command line in the unit (see ../lib/units.nix).
            assertion = lib.all (p: builtins.match "[A-Za-z0-9._/@:+=-]+" p != null) [
              cfg.caFile
              cfg.certFile
              cfg.keyFile
            ];
            message = "services.ztna.${role}: caFile, certFile and keyFile may hold only letters, digits and . _ / @ : + = - (no spaces, quotes, $ or %).";
          }
          {
            assertion = cfg.settings.drain_timeout == "${toString cfg.drainTimeout}s";
            message = "services.ztna.${role}: set drainTimeout (seconds; now ${toString cfg.drainTimeout}) rather than settings.drain_timeout (${cfg.settings.drain_timeout}): the unit's TimeoutStopSec follows drainTimeout, and systemd would kill a longer drain.";
          }
          {
            assertion = cfg.openOpsFirewall -> !opsIsLoopback;
            message = "services.ztna.${role}.openOpsFirewall: settings.ops_listen (${cfg.settings.ops_listen}) is a loopback address, so no other host can scrape it; listen on e.g. 0.0.0.0:${toString ops.port}.";
          }
        ] ++ assertions { inherit lib cfg; };

        warnings = lib.optional (cfg.configCheckPackage == null)
          "services.ztna.${role}: the build platform cannot run ${name}, so its config is not validated at build time (set configCheckPackage).";

        services.ztna.${role}.settings.drain_timeout = lib.mkDefault "${toString cfg.drainTimeout}s";

        system.checks = lib.optional (cfg.configCheckPackage != null) configCheck;

        networking.firewall.allowedTCPPorts = lib.mkIf cfg.openOpsFirewall [ ops.port ];

        # Agents and connectors ask for 4 MiB UDP socket buffers (a relay path with the kernel's
        # default ~208 KiB drops bursts that QUIC takes for congestion; the intermediate asks for
        # more, see intermediate.nix). The highest of all definitions wins, so this never lowers
        # what another service asked for.
        boot.kernel.sysctl."net.core.rmem_max" = 7500000;
        boot.kernel.sysctl."net.core.wmem_max" = 7500000;

        environment.etc.${etcConfig}.source = configFile;

        systemd.services.${name} = units.unit {
          inherit role;
          configFile = "/etc/${etcConfig}";
          restartTriggers = [ restartConfig ];
          reloadTriggers = lib.optional (reloadable != [ ]) configFile;
          execStart = "${cfg.package}/bin/${name}";
          credentials = {
            ca = cfg.caFile;
            cert = cfg.certFile;
            key = cfg.keyFile;
          };
          drainTimeoutSec = cfg.drainTimeout;
          inherit (cfg) watchdogSec limitNOFILE;
          # Its own listening ports, or the ops endpoint's, below 1024.
          bindsPrivilegedPort = (extra.bindsPrivilegedPort or false) || ops.port < 1024;
          killCommand = "${pkgs.coreutils}/bin/kill";
          coreutils = "${pkgs.coreutils}";
          shell = "${pkgs.bash}/bin/bash";
        };
      }
      (builtins.removeAttrs extra [ "bindsPrivilegedPort" ])
    ]
  );
}
