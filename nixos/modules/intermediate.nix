# services.ztna.intermediate: the public QUIC relay.
import ./daemon.nix {
  role = "intermediate";
  description = "the ZTNA intermediate (public QUIC relay)";
  # SIGHUP applies a new policy without dropping a connection (and re-reads the certificates).
  reloadable = [ "policy" ];

  settingsOptions =
    { lib, ... }:
      with lib;
      {
        listen = mkOption {
          type = types.str;
          default = "0.0.0.0:4433";
          description = "QUIC (UDP) listen address.";
        };
        ops_listen = mkOption {
          type = types.str;
          default = "127.0.0.1:9470";
          description = "Ops endpoint (/metrics, /healthz, /readyz); see also `openOpsFirewall`.";
        };
        reconnect_hint = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "Addresses sent to peers in GoAway (e.g. the other intermediate).";
        };
        policy = mkOption {
          default = [ ];
          description = "Who may serve and reach each service; anything not allowed is denied.";
          type = types.listOf (
            types.submodule {
              options = {
                service = mkOption { type = types.str; };
                connectors = mkOption {
                  type = types.listOf types.str;
                  default = [ ];
                  example = [ "spiffe://corp.example/connector/web-*" ];
                };
                agents = mkOption {
                  type = types.listOf types.str;
                  default = [ ];
                  example = [ "spiffe://corp.example/agent/*" ];
                };
              };
            }
          );
        };
      };

  extraOptions =
    { lib, ... }:
    {
      openFirewall = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = "Open the QUIC UDP port of `settings.listen` in the firewall.";
      };
    };

  assertions =
    { lib, cfg }:
    [
      {
        assertion = cfg.settings.policy != [ ];
        message = "services.ztna.intermediate.settings.policy is empty: every registration and flow would be denied.";
      }
      {
        assertion = lib.all (r: r.connectors != [ ] && r.agents != [ ]) cfg.settings.policy;
        message = "services.ztna.intermediate.settings.policy: every rule needs at least one connectors and one agents pattern.";
      }
    ];

  extraConfig =
    { lib, cfg }:
    let
      port = lib.toInt (lib.last (lib.splitString ":" cfg.settings.listen));
    in
    {
      bindsPrivilegedPort = port < 1024;
      networking.firewall.allowedUDPPorts = lib.mkIf cfg.openFirewall [ port ];
      # The intermediate asks for 16 MiB UDP socket buffers: every peer's packets arrive on one
      # socket, and in a reconnect storm a 4 MiB buffer overflowed. The highest definition wins.
      boot.kernel.sysctl."net.core.rmem_max" = 16777216;
      boot.kernel.sysctl."net.core.wmem_max" = 16777216;
    };
}
