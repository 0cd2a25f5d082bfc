# services.ztna.agent: services on local ports, tunnelled through an intermediate.
import ./daemon.nix {
  role = "agent";
  description = "the ZTNA agent (local ports for remote services)";

  settingsOptions =
    { lib, ... }:
      with lib;
      {
        intermediates = mkOption {
          type = types.listOf types.str;
          description = "Intermediates in order of preference (`host:port`); the agent fails over between them.";
        };
        ops_listen = mkOption {
          type = types.str;
          default = "127.0.0.1:9472";
          description = "Ops endpoint (/metrics, /healthz, /readyz); see also `openOpsFirewall`.";
        };
        forward = mkOption {
          default = [ ];
          description = "Local ports and the services they reach.";
          type = types.listOf (
            types.submodule {
              options = {
                service = mkOption { type = types.str; };
                protocol = mkOption {
                  type = types.enum [
                    "tcp"
                    "udp"
                  ];
                  default = "tcp";
                };
                listen = mkOption {
                  type = types.str;
                  example = "127.0.0.1:8080";
                };
              };
            }
          );
        };
      };

  assertions =
    { cfg, ... }:
    [
      {
        assertion = cfg.settings.intermediates != [ ];
        message = "services.ztna.agent.settings.intermediates must list at least one intermediate.";
      }
      {
        assertion = cfg.settings.forward != [ ];
        message = "services.ztna.agent.settings.forward must list at least one local port.";
      }
    ];

  extraConfig =
    { lib, cfg }:
    {
      # A local port below 1024 (a DNS forward on :53, say) needs CAP_NET_BIND_SERVICE.
      bindsPrivilegedPort = lib.any (f: lib.toInt (lib.last (lib.splitString ":" f.listen)) < 1024) cfg.settings.forward;
    };
}
