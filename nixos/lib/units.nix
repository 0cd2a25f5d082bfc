# The systemd units of the ZTNA daemons as pure Nix data: no nixpkgs, no lib, so that
# `nix-instantiate --eval` can render them anywhere (tests/system/render-units does, to prove the
# units under real systemd) and the NixOS modules use exactly the same data.
#
#   unit {
#     role = "intermediate";               # intermediate | connector | agent
#     execStart = "/nix/store/...-ztna/bin/ztna-intermediate";
#     configFile = "/etc/ztna/intermediate.toml";
#     credentials = { ca = "/run/keys/ca.pem"; cert = "..."; key = "..."; };
#     drainTimeoutSec = 30;                # the daemon's drain_timeout
#     watchdogSec = 30;
#     bindsPrivilegedPort = false;         # true: CAP_NET_BIND_SERVICE (listen port < 1024)
#     limitNOFILE = 65536;                 # open files: one UDP socket per connector flow
#     killCommand = "/run/current-system/sw/bin/kill";
#     restartTriggers = [ ];               # what a config switch restarts the unit for
#     reloadTriggers = [ ];                # what it only reloads it for (SIGHUP)
#   }
#
# returns { description, after, wants, wantedBy, stopIfChanged, restartTriggers, reloadTriggers,
# serviceConfig }, the shape of a NixOS `systemd.services.<name>` entry. Credentials arrive with LoadCredential= and the config
# refers to them by name (ca.pem, cert.pem, key.pem): the daemons resolve relative TLS paths in
# $CREDENTIALS_DIRECTORY, so keys are never copied into the Nix store.
let
  credentialNames = {
    ca = "ca.pem";
    cert = "cert.pem";
    key = "key.pem";
  };

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
  inherit credentialNames hardening;

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
    , restartTriggers ? [ ]
    , reloadTriggers ? [ ]
    ,
    }:
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
        ExecReload = "${killCommand} -HUP $MAINPID";
        WatchdogSec = watchdogSec;
        # Long enough for the drain, plus room to tell peers and exit.
        TimeoutStopSec = drainTimeoutSec + 15;
        Restart = "always";
        RestartSec = 1;
        LoadCredential = map (c: "${credentialNames.${c}}:${credentials.${c}}") [
          "ca"
          "cert"
          "key"
        ];
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
