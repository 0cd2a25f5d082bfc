# nixosModules.monitoring: Prometheus scrape jobs for the ZTNA daemons' ops endpoints, the alert
# rules (nixpkgs checks them with promtool at build time), and Grafana with the Prometheus data
# source and the "ZTNA overview" dashboard provisioned.
{ config, lib, ... }:

let
  cfg = config.services.ztna.monitoring;
  inherit (lib) mkEnableOption mkIf mkOption types;
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
      example = [ "relay-blue.example.com:9090" "relay-green.example.com:9090" ];
      description = "`host:port` of each intermediate's ops endpoint (its `ops_listen`).";
    };

    connectors = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "10.0.1.20:9091" ];
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
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.intermediates != [ ] || cfg.connectors != [ ] || cfg.agents != [ ];
        message = "services.ztna.monitoring: list at least one ops endpoint to scrape.";
      }
    ];

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
      provision = {
        enable = true;
        datasources.settings.datasources = [
          {
            name = "Prometheus";
            type = "prometheus";
            uid = "prometheus";
            url = "http://127.0.0.1:${toString config.services.prometheus.port}";
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
