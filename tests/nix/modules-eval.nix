# Evaluates the intermediate, connector and agent modules with nixpkgs' lib alone. pkgs and the
# NixOS options they set are stubbed, so this checks our modules' own logic: the unit (from
# nixos/lib/units.nix) with credentials, capabilities, the rendered settings, the firewall and
# the assertions.
# Run: nix-instantiate --eval --strict --json tests/nix/modules-eval.nix --arg lib 'import /path/to/nixpkgs.lib/lib'
{ lib }:
let
  pkgs = {
    formats.toml = _: {
      type = lib.types.attrsOf lib.types.anything;
      generate = name: value: builtins.toFile name (builtins.toJSON value);
    };
    runCommand = name: _env: _script: "/nix/store/00000000000000000000000000000000-${name}";
    coreutils = "/nix/store/00000000000000000000000000000000-coreutils";
  };
  stubs = {
    options.assertions = lib.mkOption {
      type = lib.types.listOf lib.types.unspecified;
      default = [ ];
    };
    options.systemd.services = lib.mkOption {
      type = lib.types.attrsOf lib.types.anything;
      default = { };
    };
    options.networking.firewall.allowedUDPPorts = lib.mkOption {
      type = lib.types.listOf lib.types.port;
      default = [ ];
    };
    options.services.prometheus = lib.mkOption {
      type = lib.types.attrsOf lib.types.anything;
      default = { };
    };
    options.services.grafana = lib.mkOption {
      type = lib.types.attrsOf lib.types.anything;
      default = { };
    };
    config._module.args.pkgs = pkgs;
  };
  eval =
    cfg:
    (lib.evalModules {
      modules = [
        stubs
        ../../nixos/modules/default.nix
        { services.ztna = cfg; }
      ];
    }).config;
  secrets = {
    caFile = "/run/keys/ca.pem";
    certFile = "/run/keys/cert.pem";
    keyFile = "/run/keys/key.pem";
  };
  pkg = "/nix/store/11111111111111111111111111111111-ztna";
  relay = eval {
    intermediate = secrets // {
      enable = true;
      package = pkg;
      openFirewall = true;
      drainTimeout = 20;
      settings.listen = "0.0.0.0:443";
      settings.policy = [
        {
          service = "web";
          connectors = [ "spiffe://corp.example/connector/*" ];
          agents = [ "spiffe://corp.example/agent/*" ];
        }
      ];
    };
  };
  unit = relay.systemd.services.ztna-intermediate;
  sc = unit.serviceConfig;
  conn = eval {
    connector = secrets // {
      enable = true;
      package = pkg;
      settings.intermediates = [ "relay:4433" ];
      settings.service = [
        {
          name = "web";
          tcp = "127.0.0.1:8080";
        }
      ];
    };
  };
  connUnit = conn.systemd.services.ztna-connector;
  failing = cfg: map (a: a.message) (builtins.filter (a: !a.assertion) (eval cfg).assertions);
  badConnector = failing {
    connector = secrets // {
      enable = true;
      package = pkg;
      keyFile = "/nix/store/22222222222222222222222222222222-key.pem";
      settings.intermediates = [ ];
      settings.service = [{ name = "web"; }];
    };
  };
  badRelay = failing {
    intermediate = secrets // {
      enable = true;
      package = pkg;
    };
  };
in
assert sc.Type == "notify" && sc.NotifyAccess == "main" && sc.WatchdogSec == 30;
assert sc.TimeoutStopSec == 35;
assert sc.ExecStart == "${pkg}/bin/ztna-intermediate --config /nix/store/00000000000000000000000000000000-ztna-intermediate-config-checked.toml";
assert sc.ExecReload == "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
assert sc.LoadCredential == [
  "ca.pem:/run/keys/ca.pem"
  "cert.pem:/run/keys/cert.pem"
  "key.pem:/run/keys/key.pem"
];
# Port 443 needs CAP_NET_BIND_SERVICE; the connector gets no capability at all.
assert sc.CapabilityBoundingSet == "CAP_NET_BIND_SERVICE";
assert connUnit.serviceConfig.CapabilityBoundingSet == "";
assert connUnit.serviceConfig.TimeoutStopSec == 45;
assert unit.stopIfChanged == false && unit.after == [ "network-online.target" ];
assert relay.networking.firewall.allowedUDPPorts == [ 443 ];
assert conn.networking.firewall.allowedUDPPorts == [ ];
assert relay.services.ztna.intermediate.settings.drain_timeout == "20s";
assert !(conn.services.ztna.connector.settings.service == [ ]);
assert builtins.length badConnector == 3;
assert builtins.length badRelay == 1;
{
  intermediateUnit = unit;
  connectorAssertions = badConnector;
  intermediateAssertions = badRelay;
}
