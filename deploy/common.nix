# What every ZTNA host deployed with deploy-rs shares: the EC2 image, SSH for deploy-rs, and a
# readiness gate that fails the activation (so deploy-rs rolls back) when a daemon does not become
# ready.
{ config, lib, pkgs, modulesPath, ... }:
let
  # Each enabled ZTNA daemon and its ops endpoint.
  daemons = lib.filterAttrs (_: d: d.enable) {
    intermediate = config.services.ztna.intermediate or { enable = false; };
    connector = config.services.ztna.connector or { enable = false; };
    agent = config.services.ztna.agent or { enable = false; };
  };
in
{
  imports = [ "${modulesPath}/virtualisation/amazon-image.nix" ];

  services.openssh = {
    enable = true;
    settings.PermitRootLogin = "prohibit-password";
    settings.PasswordAuthentication = false;
  };
  nix.settings.trusted-users = [ "root" ];
  system.stateVersion = "26.05";

  # Type=notify already makes `switch-to-configuration` wait for READY=1. This gate also waits for
  # /readyz (intermediate listening; connector registered with at least one intermediate), and
  # fails the activation if it does not come within 60 s: deploy-rs then rolls back. Each probe
  # is bounded (--max-time): a daemon that accepts the connection but never answers (hung) must
  # not hold the activation forever (a oneshot has no start timeout by default).
  systemd.services = lib.mapAttrs'
    (role: d: lib.nameValuePair "ztna-${role}-ready" {
      description = "Wait until ztna-${role} reports ready";
      after = [ "ztna-${role}.service" ];
      requires = [ "ztna-${role}.service" ];
      partOf = [ "ztna-${role}.service" ];
      wantedBy = [ "multi-user.target" ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      script = ''
        deadline=$((SECONDS + 60))
        while [ "$SECONDS" -lt "$deadline" ]; do
          if ${pkgs.curl}/bin/curl -sf --max-time 2 http://${d.settings.ops_listen}/readyz; then exit 0; fi
          sleep 0.5
        done
        echo "ztna-${role} did not become ready within 60 s" >&2
        exit 1
      '';
    })
    daemons;
}
