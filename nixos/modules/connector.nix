# services.ztna.connector: next to the private backends; dials out to every intermediate.
import ./daemon.nix {
  role = "connector";
  description = "the ZTNA connector (forwards flows to private backends)";

  settingsOptions =
    { lib, ... }:
      with lib;
      {
        intermediates = mkOption {
          type = types.listOf types.str;
          example = [
            "relay-blue.example.com:4433"
            "relay-green.example.com:4433"
          ];
          description = "Every intermediate (`host:port`); the connector registers with all of them.";
        };
        ops_listen = mkOption {
          type = types.str;
          default = "127.0.0.1:9471";
          description = "Ops endpoint (/metrics, /healthz, /readyz); see also `openOpsFirewall`.";
        };
        service = mkOption {
          default = [ ];
          description = "Services offered and their backends.";
          type = types.listOf (
            types.submodule {
              options = {
                name = mkOption { type = types.str; };
                tcp = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                  example = "127.0.0.1:8080";
                };
                udp = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                };
              };
            }
          );
        };
      };

  assertions =
    { lib, cfg }:
    [
      {
        assertion = cfg.settings.intermediates != [ ];
        message = "services.ztna.connector.settings.intermediates must list at least one intermediate.";
      }
      {
        assertion = cfg.settings.service != [ ];
        message = "services.ztna.connector.settings.service must list at least one service.";
      }
      {
        assertion = lib.all (s: s.tcp != null || s.udp != null) cfg.settings.service;
        message = "services.ztna.connector.settings.service: every service needs a tcp and/or udp backend.";
      }
    ];
}
