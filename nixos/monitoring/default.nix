# nixosModules.monitoring: Prometheus scrape jobs for the ZTNA daemons' ops endpoints, the alert
# rules (nixpkgs checks them with promtool at build time), and Grafana with the Prometheus data
# source and the "ZTNA overview" dashboard provisioned.
{ config, lib, ... }:

let
  cfg = config.services.ztna.monitoring;
  inherit (lib) mkEnableOption mkIf mkOption types;
  # ZTNA daemons enabled on this host, and the port of each one's ops endpoint.
  localOps = lib.mapAttrs (_: d: lib.toInt (lib.last (lib.splitString ":" d.settings.ops_listen)))
    (lib.filterAttrs (_: d: d.enable or false) {
      intermediate = config.services.ztna.intermediate or { };
      connector = config.services.ztna.connector or { };
      agent = config.services.ztna.agent or { };
    });
  promPort = config.services.prometheus.port;
  job = name: targets: {
    job_name = name;
    scrape_interval = cfg.scrapeInterval;
    static_configs = [{ inherit targets; }];
  };
in
{
  options.services.ztna.monitoring = {
    enable = mkEnableOption "Prometheus scraping, alerting and Grafana dashboards for ZTNA";

    intermediates = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "relay-blue.example.com:9470" "relay-green.example.com:9470" ];
      description = "`host:port` of each intermediate's ops endpoint (its `ops_listen`).";
    };

    connectors = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "10.0.1.20:9471" ];
      description = "`host:port` of each connector's ops endpoint.";
    };

    agents = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "`host:port` of agents' ops endpoints, if any are scraped.";
    };

    scrapeInterval = mkOption {
      type = types.str;
      default = "15s";
      description = "Scrape interval of the ZTNA jobs.";
    };

    grafana.enable = mkOption {
      type = types.bool;
      default = true;
      description = "Provision the Prometheus data source and the ZTNA dashboard in Grafana.";
    };

    grafana.secretKeyFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/keys/grafana-secret-key";
      description = ''
        File holding Grafana's `secret_key` (e.g. `openssl rand -hex 32`), readable by the
        `grafana` user. Grafana reads it at start (`$__file{...}`), so the key never enters the
        Nix store; give a string, not a Nix path. Required with `grafana.enable` (NixOS 26.05's
        Grafana has no default key).
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.intermediates != [ ] || cfg.connectors != [ ] || cfg.agents != [ ];
        message = "services.ztna.monitoring: list at least one ops endpoint to scrape.";
      }
      {
        assertion = cfg.grafana.enable -> cfg.grafana.secretKeyFile != null;
        message = "services.ztna.monitoring.grafana.secretKeyFile must be set: Grafana needs a secret_key (a file outside the Nix store).";
      }
      {
        assertion = cfg.grafana.secretKeyFile != null -> lib.hasPrefix "/" cfg.grafana.secretKeyFile && !lib.hasPrefix builtins.storeDir cfg.grafana.secretKeyFile;
        message = "services.ztna.monitoring.grafana.secretKeyFile must be an absolute path outside the Nix store.";
      }
    ] ++ lib.mapAttrsToList
      (role: port: {
        assertion = port != promPort;
        message = "services.ztna.${role}.settings.ops_listen uses port ${toString port}, which Prometheus (services.prometheus.port) listens on on this host; pick another port.";
      })
      localOps;

    services.prometheus = {
      enable = true;
      # nixpkgs runs `promtool check rules` on these at build time.
      ruleFiles = [ ./alerts.yml ];
      scrapeConfigs =
        lib.optional (cfg.intermediates != [ ]) (job "ztna-intermediate" cfg.intermediates)
        ++ lib.optional (cfg.connectors != [ ]) (job "ztna-connector" cfg.connectors)
        ++ lib.optional (cfg.agents != [ ]) (job "ztna-agent" cfg.agents);
    };

    services.grafana = mkIf cfg.grafana.enable {
      enable = true;
      settings.security.secret_key = mkIf (cfg.grafana.secretKeyFile != null) "$__file{${cfg.grafana.secretKeyFile}}";
      provision = {
        enable = true;
        datasources.settings.datasources = [
          {
            name = "Prometheus";
            type = "prometheus";
            uid = "prometheus";
            url = "http://127.0.0.1:${toString promPort}";
            isDefault = true;
          }
        ];
        dashboards.settings.providers = [
          {
            name = "ztna";
            folder = "ZTNA";
            options.path = ./dashboards;
          }
        ];
      };
    };
  };
}
