# The systemd units of the ZTNA daemons as pure Nix data: no nixpkgs, no lib, so that
# `nix-instantiate --eval` can render them anywhere (tests/system/render-units does, to prove the
# units under real systemd) and the NixOS modules use exactly the same data.
#
#   unit {
#     role = "intermediate";               # intermediate | connector | agent
#     execStart = "/nix/store/...-ztna/bin/ztna-intermediate";
#     configFile = "/etc/ztna/intermediate.toml";
#     credentials = { ca = "/run/keys/ca.pem"; cert = "..."; key = "..."; };  # where the operator keeps them
#     drainTimeoutSec = 30;                # the daemon's drain_timeout
#     watchdogSec = 30;
#     bindsPrivilegedPort = false;         # true: CAP_NET_BIND_SERVICE (listen port < 1024)
#     limitNOFILE = 65536;                 # open files: one UDP socket per connector flow
#     killCommand = "/run/current-system/sw/bin/kill";
#     coreutils = "/run/current-system/sw";  # bin/{install,mv,rm,stat}
#     shell = "/run/current-system/sw/bin/bash";
#     restartTriggers = [ ];               # what a config switch restarts the unit for
#     reloadTriggers = [ ];                # what it only reloads it for (SIGHUP)
#   }
#
# returns { description, after, wants, wantedBy, stopIfChanged, restartTriggers, reloadTriggers,
# serviceConfig }, the shape of a NixOS `systemd.services.<name>` entry.
#
# Certificates and key: the daemon runs as a dynamic user, which cannot read them where the
# operator keeps them (root's, mode 0600). Before it starts, and before each reload's SIGHUP, a
# privileged step ("+": as root, outside the sandbox) copies them into /run/ztna-tls/<role>
# (`tlsFiles`): a directory root owns, mode 0750, group the service's dynamic group (read from
# its runtime directory /run/ztna-<role>), files root's, mode 0440. The daemon can read them and
# change nothing there, so root never writes through a path the daemon controls. All three are
# written first and then renamed into place: a missing or unreadable source file fails the step
# and leaves the files in use as they were. They are removed when the service stops, and are
# never in the Nix store. So `systemctl reload` applies a re-issued certificate (LoadCredential=
# copies only at start: systemd does not refresh credentials on reload). The cost: the copies
# live on /run (tmpfs), which can be swapped out, where LoadCredential's ramfs cannot; on a host
# with swap, encrypt it.
let
  tlsFiles = role: {
    ca = "/run/ztna-tls/${role}/ca.pem";
    cert = "/run/ztna-tls/${role}/cert.pem";
    key = "/run/ztna-tls/${role}/key.pem";
  };

  # The copy step as one shell command line for systemd: `$` and `%` escaped for its parser.
  copyTls =
    { role, credentials, coreutils, shell }:
    let
      bin = p: if coreutils == null then p else "${coreutils}/bin/${p}";
      files = tlsFiles role;
      dir = "/run/ztna-tls/${role}";
      names = [ "ca" "cert" "key" ];
      script = builtins.concatStringsSep "; " (
        [
          "set -eu"
          "g=$(${bin "stat"} -c %g /run/ztna-${role})"
          "${bin "install"} -d -m 0755 -o root -g root /run/ztna-tls"
          "${bin "install"} -d -m 0750 -o root -g \"$g\" ${dir}"
        ]
        ++ map (c: "${bin "install"} -m 0440 -o root -g \"$g\" \"${credentials.${c}}\" ${files.${c}}.new") names
        ++ map (c: "${bin "mv"} -f ${files.${c}}.new ${files.${c}}") names
      );
      escaped = builtins.replaceStrings [ "$" "%" ] [ "$$" "%%" ] script;
    in
    "+${shell} -c '${escaped}'";

  hardening = {
    # Identity and privileges.
    DynamicUser = true;
    NoNewPrivileges = true;
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    UMask = "0077";
    # File system.
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    DevicePolicy = "closed";
    ProtectProc = "invisible";
    ProcSubset = "pid";
    # Kernel and host. PrivateUsers=true is set by `unit` below unless the service needs a
    # capability: in a private user namespace it has none in the host's namespace.
    PrivateIPC = true;
    ProtectHostname = true;
    ProtectClock = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    KeyringMode = "private";
    # What the process may do.
    RestrictAddressFamilies = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX" # sd_notify
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    RemoveIPC = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged @resources"
    ];
    SystemCallErrorNumber = "EPERM";
  };
in
{
  inherit tlsFiles hardening;

  unit =
    { role
    , execStart
    , configFile
    , credentials
    , drainTimeoutSec ? 30
    , watchdogSec ? 30
    , bindsPrivilegedPort ? false
    , limitNOFILE ? 65536
    , killCommand ? "kill"
    , coreutils ? null
    , shell ? "/bin/sh"
    , restartTriggers ? [ ]
    , reloadTriggers ? [ ]
    ,
    }:
    let
      copy = copyTls { inherit role credentials coreutils shell; };
      rm = if coreutils == null then "rm" else "${coreutils}/bin/rm";
    in
    {
      description = "ZTNA ${role}";
      documentation = [ "https://github.com/ztna/ztna/blob/main/docs/operations.md" ];
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      wantedBy = [ "multi-user.target" ];
      # Restart (SIGTERM: graceful drain) rather than stop-then-start on a config switch.
      stopIfChanged = false;
      # ExecStart names a fixed path, so a switch that changes only what a reload applies (the
      # intermediate's policy) reloads the unit (SIGHUP, no connection dropped); any other
      # change restarts it.
      inherit restartTriggers reloadTriggers;
      serviceConfig = hardening // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${execStart} --config ${configFile}";
        RuntimeDirectory = "ztna-${role}";
        RuntimeDirectoryMode = "0700";
        ExecStartPre = copy;
        ExecReload = [ copy "${killCommand} -HUP $MAINPID" ];
        ExecStopPost = "+${rm} -rf /run/ztna-tls/${role}";
        WatchdogSec = watchdogSec;
        # Long enough for the drain, plus room to tell peers and exit.
        TimeoutStopSec = drainTimeoutSec + 15;
        Restart = "always";
        RestartSec = 1;
        # systemd's default soft limit (1024) was used up by ~1000 idle UDP flows (issue 12).
        LimitNOFILE = limitNOFILE;
        # A port below 1024 needs CAP_NET_BIND_SERVICE in the user namespace that owns the
        # network namespace (the host's). With PrivateUsers=true the service runs in a user
        # namespace of its own and holds the capability only there, so bind() fails with EACCES
        # (systemd.exec(5), PrivateUsers=). Such a unit keeps the capability and gives up
        # PrivateUsers; every other unit has no capability and a private user namespace.
        PrivateUsers = !bindsPrivilegedPort;
        CapabilityBoundingSet = if bindsPrivilegedPort then "CAP_NET_BIND_SERVICE" else "";
        AmbientCapabilities = if bindsPrivilegedPort then "CAP_NET_BIND_SERVICE" else "";
        Environment = [ "RUST_LOG=info" ];
      };
    };
}
