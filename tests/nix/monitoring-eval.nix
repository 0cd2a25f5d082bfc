# Evaluates nixosModules.monitoring with nixpkgs' lib alone (no nixpkgs package set): the options
# of services.prometheus/grafana are stubbed as free-form, so this checks our module's logic —
# the scrape jobs, rule files, Grafana provisioning and assertions it produces.
# Run: nix-instantiate --eval --strict --json tests/nix/monitoring-eval.nix --arg lib 'import /path/to/nixpkgs.lib/lib'
{ lib }:
let
  stubs =
    { lib, ... }:
    let
      freeform =
        extra:
        lib.mkOption {
          type = lib.types.submodule {
            freeformType = lib.types.attrsOf lib.types.anything;
            options = extra;
          };
          default = { };
        };
    in
    {
      options.assertions = lib.mkOption {
        type = lib.types.listOf lib.types.unspecified;
        default = [ ];
      };
      options.services.prometheus = freeform {
        port = lib.mkOption {
          type = lib.types.port;
          default = 9090;
        };
      };
      options.services.grafana = freeform { };
    };
  eval =
    settings:
    (lib.evalModules {
      modules = [
        stubs
        ../../nixos/monitoring/default.nix
        { services.ztna.monitoring = settings; }
      ];
    }).config;
  full = eval {
    enable = true;
    intermediates = [
      "relay-blue:9090"
      "relay-green:9090"
    ];
    connectors = [ "conn-1:9091" ];
  };
  empty = eval { enable = true; };
  off = eval { };
  failed = builtins.filter (a: !a.assertion) empty.assertions;
in
assert full.services.prometheus.enable;
assert
map (j: j.job_name) full.services.prometheus.scrapeConfigs == [
  "ztna-intermediate"
  "ztna-connector"
];
assert (builtins.head full.services.prometheus.scrapeConfigs).static_configs == [
  {
    targets = [
      "relay-blue:9090"
      "relay-green:9090"
    ];
  }
];
assert builtins.length full.services.prometheus.ruleFiles == 1;
assert builtins.baseNameOf (toString (builtins.head full.services.prometheus.ruleFiles)) == "alerts.yml";
assert
(builtins.head full.services.grafana.provision.datasources.settings.datasources).url
  == "http://127.0.0.1:9090";
assert builtins.length failed == 1;
assert !(off.services.prometheus ? enable);
{
  jobs = map (j: j.job_name) full.services.prometheus.scrapeConfigs;
  assertionWithoutTargets = (builtins.head failed).message;
  ok = true;
}
