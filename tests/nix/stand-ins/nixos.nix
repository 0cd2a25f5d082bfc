# Stand-in for NixOS (nixpkgs' nixos/lib/eval-config.nix) with nixpkgs' real lib.evalModules, the
# real systemd.services declarations and unit renderer (../shared/nix/nixos-subset), and typed
# declarations of every other option that flake.nix, nixos/, deploy/ and tests/nixos/ set: their
# real names and types at the pinned nixpkgs revision (see tests/nix/README.md), not free-form
# stubs, so a misspelt option, a wrong type or a failed assertion fails here as in `nixos-rebuild`.
{ lib, subset, mkPkgs }:
let
  inherit (lib) mkOption types;
  opt = type: default: mkOption { inherit type default; };
  canonicalizePortList = ports: lib.unique (builtins.sort builtins.lessThan ports);
  systemString = p: if builtins.isString p then p else p.system;

  base =
    { config, ... }:
    let
      hostSystem = systemString config.nixpkgs.hostPlatform;
      buildSystem = systemString config.nixpkgs.buildPlatform;
      pkgs = mkPkgs { system = hostSystem; inherit buildSystem; };
      sd = import subset { inherit lib pkgs; };
      failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
      units = lib.mapAttrs (n: v: (sd.serviceToUnit n v).text) (lib.filterAttrs (_: v: v.enable) config.systemd.services);
    in
    {
      options = {
        # nixos/modules/misc/assertions.nix
        assertions = opt (types.listOf types.unspecified) [ ];
        warnings = opt (types.listOf types.str) [ ];
        # nixos/modules/misc/nixpkgs.nix
        nixpkgs.hostPlatform = mkOption { type = types.either types.str types.attrs; };
        nixpkgs.buildPlatform = mkOption {
          type = types.either types.str types.attrs;
          default = config.nixpkgs.hostPlatform;
        };
        # nixos/modules/system/activation/top-level.nix, activation-script.nix, misc/version.nix
        system.stateVersion = opt types.str "26.05";
        system.checks = opt (types.listOf types.package) [ ];
        system.build = opt (types.lazyAttrsOf types.unspecified) { };
        system.activationScripts = opt
          (types.attrsOf (
            types.either types.str (
              types.submodule {
                options = {
                  deps = opt (types.listOf types.str) [ ];
                  text = mkOption { type = types.lines; };
                  supportsDryActivation = opt types.bool false;
                };
              }
            )
          ))
          { };
        # nixos/modules/config/system-path.nix
        environment.systemPackages = opt (types.listOf types.package) [ ];
        # nixos/modules/system/etc/etc.nix
        environment.etc = opt
          (types.attrsOf (
            types.submodule (
              { name, config, ... }:
              {
                options = {
                  enable = opt types.bool true;
                  target = mkOption { type = types.str; };
                  text = opt (types.nullOr types.lines) null;
                  source = mkOption { type = types.path; };
                  mode = opt types.str "symlink";
                  uid = opt types.int 0;
                  gid = opt types.int 0;
                  user = opt types.str "+${toString config.uid}";
                  group = opt types.str "+${toString config.gid}";
                };
                config = {
                  target = lib.mkDefault name;
                  source = lib.mkIf (config.text != null) (lib.mkDefault (builtins.toFile "etc-${baseNameOf name}" config.text));
                };
              }
            )
          ))
          { };
        # nixos/modules/tasks/network-interfaces.nix
        networking.hostName = opt (types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$") "nixos";
        networking.interfaces = opt
          (types.attrsOf (
            types.submodule {
              options.ipv4.addresses = opt
                (types.listOf (
                  types.submodule {
                    options = {
                      address = mkOption { type = types.str; };
                      prefixLength = mkOption { type = types.addCheck types.int (n: n >= 0 && n <= 32); };
                    };
                  }
                ))
                [ ];
            }
          ))
          { };
        # nixos/modules/tasks/network-interfaces.nix: a string is coerced to { address } (gatewayOpts)
        networking.enableIPv6 = opt types.bool true;
        networking.defaultGateway = opt
          (types.nullOr (
            types.coercedTo types.str (address: { inherit address; }) (
              types.submodule {
                options = {
                  address = mkOption { type = types.str; };
                  interface = opt (types.nullOr types.str) null;
                  metric = opt (types.nullOr types.int) null;
                  source = opt (types.nullOr types.str) null;
                };
              }
            )
          ))
          null;
        # nixos/modules/config/sysctl.nix: free-form sysctls (bool, str, int or null), except the
        # socket buffer maxima, where conflicting definitions resolve to the highest
        boot.kernel.sysctl =
          let
            sysctlValue = types.mkOptionType {
              name = "sysctl option value";
              check = v: builtins.isBool v || builtins.isString v || builtins.isInt v || v == null;
              merge = loc: defs: lib.mergeOneOption loc (lib.filterOverrides defs);
            };
            highest = types.ints.unsigned // {
              merge = _loc: defs:
                lib.foldl (a: b: if b.value == null then null else lib.max a b.value) 0 (lib.filterOverrides defs);
            };
          in
          opt
            (types.submodule {
              freeformType = types.attrsOf sysctlValue;
              options = {
                "net.core.rmem_max" = opt (types.nullOr highest) null;
                "net.core.wmem_max" = opt (types.nullOr highest) null;
              };
            })
            { };
        # nixos/modules/services/networking/firewall.nix
        networking.firewall = {
          enable = opt types.bool true;
          allowedTCPPorts = opt (types.listOf types.port) [ ] // { apply = canonicalizePortList; };
          allowedUDPPorts = opt (types.listOf types.port) [ ] // { apply = canonicalizePortList; };
        };
        # nixos/modules/services/networking/ssh/sshd.nix
        services.openssh = {
          enable = opt types.bool false;
          settings = opt
            (types.submodule {
              freeformType = types.attrsOf (types.nullOr (types.oneOf [ types.bool types.int types.str (types.listOf types.str) ]));
              options = {
                PermitRootLogin = opt (types.enum [ "yes" "without-password" "prohibit-password" "forced-commands-only" "no" ]) "prohibit-password";
                PasswordAuthentication = opt types.bool true;
              };
            })
            { };
        };
        # nixos/modules/config/nix.nix
        nix.settings = opt
          (types.submodule {
            freeformType = types.attrsOf (types.oneOf [ types.bool types.int types.str types.path (types.listOf types.str) ]);
            options.trusted-users = opt (types.listOf types.str) [ "root" ];
          })
          { };
        # nixos/modules/system/boot/loader/systemd-boot/systemd-boot.nix (deploy-rs reads it)
        boot.loader.systemd-boot.enable = opt types.bool false;
        boot.loader.efi.efiSysMountPoint = opt types.str "/boot";
        # nixos/modules/system/boot/systemd.nix: the real declarations
        systemd.services = opt sd.services { };
      };

      config = {
        _module.args.pkgs = pkgs;
        # As system.build.toplevel: failed assertions abort the build, and the units are rendered
        # by the real renderer (serviceToUnit), which also runs the Type=/Restart= checks.
        system.build.toplevel =
          if failed != [ ] then
            throw "\nFailed assertions:\n${lib.concatMapStrings (m: "- ${m}\n") failed}"
          else
            builtins.deepSeq units {
              type = "derivation";
              name = "nixos-system-${config.networking.hostName}";
              system = hostSystem;
              outPath = "/nix/store/00000000000000000000000000000000-nixos-system-${config.networking.hostName}";
              inherit units;
              checks = config.system.checks;
              # /etc as activation links it: path below /etc -> source.
              etc = lib.mapAttrs' (_: e: lib.nameValuePair e.target e.source) (lib.filterAttrs (_: e: e.enable) config.environment.etc);
              # nixpkgs renders these into the unit as X-Restart-Triggers / X-Reload-Triggers
              # (files of their values), which switch-to-configuration compares: a change in the
              # first restarts the unit, one only in the second reloads it.
              triggers = lib.mapAttrs (_: v: { inherit (v) restartTriggers reloadTriggers; }) config.systemd.services;
            };
      };
    };

  # nixos/modules/services/networking/nat.nix (options and assertions; the iptables/nftables
  # rules and the forwarding sysctls it sets are not modelled)
  nat =
    { config, ... }:
    let
      cfg = config.networking.nat;
    in
    {
      options.networking.nat = {
        enable = opt types.bool false;
        enableIPv6 = opt types.bool false;
        internalInterfaces = opt (types.listOf types.str) [ ];
        internalIPs = opt (types.listOf types.str) [ ];
        externalInterface = opt (types.nullOr types.str) null;
        externalIP = opt (types.nullOr types.str) null;
        dmzHost = opt (types.nullOr types.str) null;
      };
      config = lib.mkIf cfg.enable {
        assertions = [
          {
            assertion = cfg.enableIPv6 -> config.networking.enableIPv6;
            message = "networking.nat.enableIPv6 requires networking.enableIPv6";
          }
          {
            assertion = (cfg.dmzHost != null) -> (cfg.externalInterface != null);
            message = "networking.nat.dmzHost requires networking.nat.externalInterface";
          }
        ];
      };
    };

  # nixos/modules/services/monitoring/prometheus/default.nix
  prometheus =
    { config, pkgs, ... }:
    let
      cfg = config.services.prometheus;
      mkOpt = type: opt (types.nullOr type) null;
      staticConfig = types.submodule {
        options = {
          labels = opt (types.attrsOf types.str) { };
          targets = mkOption { type = types.listOf types.str; };
        };
      };
      scrapeConfig = types.submodule {
        options = {
          job_name = mkOption { type = types.str; };
          scrape_interval = mkOpt types.str;
          scrape_timeout = mkOpt types.str;
          metrics_path = mkOpt types.str;
          static_configs = mkOpt (types.listOf staticConfig);
        };
      };
      # As nixpkgs' promtoolCheck: rule files are checked with the `cli` output at build time.
      checked = f: pkgs.runCommand "rules-checkrules-checked" { nativeBuildInputs = [ cfg.package.cli ]; } "ln -s ${toString f} $out\npromtool check rules $out\n";
    in
    {
      options.services.prometheus = {
        enable = opt types.bool false;
        package = opt types.package pkgs.prometheus;
        listenAddress = opt types.str "0.0.0.0";
        port = opt types.port 9090;
        ruleFiles = opt (types.listOf types.path) [ ];
        rules = opt (types.listOf types.str) [ ];
        scrapeConfigs = opt (types.listOf scrapeConfig) [ ];
      };
      config = lib.mkIf cfg.enable {
        system.checks = map checked cfg.ruleFiles;
        systemd.services.prometheus = {
          wantedBy = [ "multi-user.target" ];
          serviceConfig.ExecStart = "${lib.getExe' cfg.package "prometheus"} --web.listen-address=${cfg.listenAddress}:${toString cfg.port}";
        };
      };
    };

  # nixos/modules/services/monitoring/grafana.nix (after nixpkgs PR #484374: no default secret_key)
  grafana =
    { config, pkgs, ... }:
    let
      cfg = config.services.grafana;
      yaml = pkgs.formats.yaml { };
      iniAtom = types.nullOr (types.oneOf [ types.bool types.int types.float types.str ]);
      datasourceConfig = types.submodule {
        freeformType = yaml.type;
        options = {
          access = opt (types.enum [ "proxy" "direct" ]) "proxy";
          editable = opt types.bool false;
          jsonData = opt (types.nullOr types.attrs) null;
          name = mkOption { type = types.str; };
          secureJsonData = opt (types.nullOr types.attrs) null;
          type = mkOption { type = types.str; };
          uid = opt (types.nullOr types.str) null;
          url = opt types.str "";
        };
      };
      dashboardConfig = types.submodule {
        freeformType = yaml.type;
        options = {
          options.path = mkOption { type = types.path; };
          name = opt types.str "default";
          type = opt types.str "file";
        };
      };
      provision = itemsName: itemType: {
        path = opt (types.nullOr types.path) null;
        settings = opt
          (types.nullOr (
            types.submodule {
              options = {
                apiVersion = opt types.int 1;
                ${itemsName} = opt (types.listOf itemType) [ ];
              };
            }
          ))
          null;
      };
    in
    {
      options.services.grafana = {
        enable = opt types.bool false;
        package = opt types.package pkgs.grafana;
        openFirewall = opt types.bool false;
        provision = {
          enable = opt types.bool false;
          datasources = provision "datasources" datasourceConfig;
          dashboards = provision "providers" dashboardConfig;
        };
        settings = opt
          (types.submodule {
            freeformType = types.attrsOf (types.attrsOf iniAtom);
            options = {
              security.secret_key = opt (types.nullOr types.str) null;
              security.admin_password = opt types.str "admin";
              server.http_addr = opt types.str "127.0.0.1";
              server.http_port = opt types.port 3000;
            };
          })
          { };
      };
      config = lib.mkIf cfg.enable {
        assertions = [
          {
            assertion = cfg.provision.datasources.settings == null || cfg.provision.datasources.path == null;
            message = "Cannot set both datasources settings and datasources path";
          }
          {
            assertion = cfg.provision.dashboards.settings == null || cfg.provision.dashboards.path == null;
            message = "Cannot set both dashboards settings and dashboards path";
          }
          {
            assertion = cfg.settings.security.secret_key != null;
            message = "Grafana's secret key (services.grafana.settings.security.secret_key) doesn't have a default value anymore.";
          }
        ];
        networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ cfg.settings.server.http_port ];
        systemd.services.grafana = {
          wantedBy = [ "multi-user.target" ];
          # Forces every setting, as generating grafana.ini does.
          serviceConfig.ExecStart = "${lib.getExe' cfg.package "grafana"} server -config /nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" (builtins.toJSON cfg.settings))}-config.ini";
        };
      };
    };

  # A string, as NixOS passes it (a path would be copied to the store).
  modulesPath = toString ./nixos-modules;
in
{
  inherit modulesPath;
  baseModules = [ base nat prometheus grafana ];

  # nixpkgs.lib.nixosSystem
  nixosSystem =
    { modules
    , specialArgs ? { }
    , ...
    }:
    let
      eval = lib.evalModules {
        modules = [ base nat prometheus grafana ] ++ modules;
        specialArgs = { inherit modulesPath; } // specialArgs;
      };
    in
    eval
    // {
      pkgs = eval.config._module.args.pkgs;
    };
}
