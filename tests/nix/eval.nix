# The flake's own outputs evaluated against real NixOS semantics (see README.md in this directory):
# nixpkgs' lib, nixpkgs' real systemd.services types and unit renderer, typed stand-ins for the
# rest. Each attribute of `checks` is one check: it evaluates to a line saying what it verified, or
# fails with the error a real evaluation would give (a failed assertion, a type error, a missing
# package) or with what it expected. tests/nix/run.sh runs each on its own.
#
#   nix-instantiate --eval --strict --json tests/nix/eval.nix --arg shared /path/to/shared/nix -A checks.<name>
{ shared # ../shared/nix: nixpkgs-lib/ and nixos-subset/
, repo ? ../..
  # For `systemdSuite`: the intermediate's listen address (port 443 for the privileged-port case).
, relayListen ? "127.0.0.1:24433"
}:
let
  libPath = shared + "/nixpkgs-lib/lib";
  subset = shared + "/nixos-subset/systemd-subset.nix";
  flake = import ./stand-ins/inputs.nix { inherit libPath subset repo; };
  inherit (flake) lib self nixos;
  inherit (lib) all any attrNames attrValues concatMap concatStringsSep filter hasInfix mapAttrs;

  expect = cond: msg: if cond then true else throw "expected: ${msg}";
  ok = conds: detail: builtins.deepSeq conds (if all (c: c) (lib.flatten conds) then detail else throw "check failed");

  workspaceVersion = (builtins.fromTOML (builtins.readFile (repo + "/Cargo.toml"))).workspace.package.version;
  hostsFile =
    let
      h = builtins.fromJSON (builtins.readFile (repo + "/deploy/hosts.example.json"));
    in
    {
      intermediate-blue = h.blue;
      intermediate-green = h.green;
      inherit (h) connector;
    };

  secrets = {
    caFile = "/run/keys/ztna/ca.pem";
    certFile = "/run/keys/ztna/cert.pem";
    keyFile = "/run/keys/ztna/key.pem";
  };
  policy = [
    {
      service = "web";
      connectors = [ "spiffe://corp.example/connector/*" ];
      agents = [ "spiffe://corp.example/agent/*" ];
    }
  ];
  relay = extra: { services.ztna.intermediate = secrets // { enable = true; settings.policy = policy; } // extra; };
  connector = extra: {
    services.ztna.connector = secrets // {
      enable = true;
      settings.intermediates = [ "relay:4433" ];
      settings.service = [{ name = "web"; tcp = "127.0.0.1:8080"; }];
    } // extra;
  };
  agent = extra: {
    services.ztna.agent = secrets // {
      enable = true;
      settings.intermediates = [ "relay:4433" ];
      settings.forward = [{ service = "web"; listen = "127.0.0.1:8080"; }];
    } // extra;
  };
  monitoring = extra: {
    services.ztna.monitoring = {
      enable = true;
      intermediates = [ "relay-blue:9470" ];
      grafana.secretKeyFile = "/run/keys/grafana-secret-key";
    } // extra;
  };
  mods = self.nixosModules;

  host = system: modules: nixos.nixosSystem { modules = [{ nixpkgs.hostPlatform = system; }] ++ modules; };
  x86 = host "x86_64-linux";
  toplevel = h: h.config.system.build.toplevel;
  units = h: (toplevel h).units;
  failedAssertions = h: map (a: a.message) (filter (a: !a.assertion) h.config.assertions);
  # Every value of `Key=` in a rendered unit, in order.
  unitValues = text: key: map (l: lib.removePrefix "${key}=" l) (filter (lib.hasPrefix "${key}=") (lib.splitString "\n" text));
  # The value of `Key=` in a rendered unit, or null.
  unitValue =
    text: key:
    let
      m = builtins.match "(.*\n)?${key}=([^\n]*)\n.*" text;
    in
    if m == null then null else builtins.elemAt m 1;
  configFileOf = text: builtins.elemAt (builtins.match ".*--config ([^ \n]+).*" text) 0;
  # The file a unit's `--config /etc/...` names on host `h`, and its text and TOML.
  configSourceOf = h: name: (toplevel h).etc.${lib.removePrefix "/etc/" (configFileOf (units h).${name})};
  configTextOf = h: name: builtins.readFile (configSourceOf h name);
  configOf = h: name: builtins.fromTOML (configTextOf h name);

  # Everything with binaries the stand-in package sets know: store path -> bin/ names.
  knownBinaries =
    let
      pkgsOf = system: flake.mkPkgs { inherit system; };
      outputsOf = p: map (o: p.${o}) p.outputs;
      fromSet = ps: concatMap outputsOf (filter lib.isDerivation (attrValues (builtins.removeAttrs ps [ "terraform" ])));
      ztna = system: concatMap outputsOf (filter lib.isDerivation (attrValues self.packages.${system}));
      drvs = concatMap (s: fromSet (pkgsOf s) ++ ztna s ++ outputsOf flake.deploy-rs.packages.${s}.deploy-rs) flake.systems
        ++ concatMap (s: outputsOf (pkgsOf "x86_64-linux").pkgsCross.aarch64-multiplatform.${s}) [ "coreutils" "curl" ];
    in
    builtins.listToAttrs (map (d: lib.nameValuePair d.outPath d.binaries) drvs);
  # Every "/nix/store/<hash>-<name>/bin/<program>" in `text` names a program that output has.
  storeBinaries =
    what: text:
    let
      refs = filter builtins.isList (builtins.split "(/nix/store/[0-9a-z]{32}-[^/ \"'\n]+)/bin/([A-Za-z0-9_.+-]+)" text);
      # (the renderer's own job scripts are stubs in the subset, with an all-zero hash)
      checked = filter (r: !(lib.hasPrefix "/nix/store/00000000000000000000000000000000-" (builtins.elemAt r 0))) refs;
      bad = filter (r: !(knownBinaries ? ${builtins.elemAt r 0}) || !(builtins.elem (builtins.elemAt r 1) knownBinaries.${builtins.elemAt r 0})) checked;
    in
    expect (bad == [ ]) "${what}: every store path's bin/<program> exists in that package; not so for ${concatStringsSep ", " (map (r: "${builtins.elemAt r 0}/bin/${builtins.elemAt r 1}") bad)}";
  binariesOf = ds: concatMap (d: d.binaries or [ ]) ds;

  # Hosts that enable each exported module alone and in combinations.
  alone = {
    intermediate = x86 [ mods.intermediate (relay { }) ];
    connector = x86 [ mods.connector (connector { }) ];
    agent = x86 [ mods.agent (agent { }) ];
    monitoring = x86 [ mods.monitoring (monitoring { }) ];
    default = x86 [ mods.default (relay { }) (connector { }) (agent { }) (monitoring { }) ];
  };
  combined = {
    default-and-intermediate = x86 [ mods.default mods.intermediate (relay { }) ];
    default-connector-agent = x86 [ mods.default mods.connector mods.agent (connector { }) (agent { }) ];
    everything-twice = x86 [ mods.intermediate mods.connector mods.agent mods.monitoring mods.default mods.intermediate (relay { }) (connector { }) (agent { }) (monitoring { }) ];
    nixos-modules-dir-and-flake = x86 [ (repo + "/nixos/modules/default.nix") mods.default (relay { package = self.packages.x86_64-linux.ztna-intermediate; }) ];
  };
  privileged = x86 [ mods.intermediate (relay { settings.listen = "0.0.0.0:443"; settings.policy = policy; openFirewall = true; }) ];
  dnsAgent = x86 [ mods.agent (agent { settings = { intermediates = [ "relay:4433" ]; forward = [{ service = "dns"; protocol = "udp"; listen = "127.0.0.1:53"; }]; }; }) ];
  cross = host "aarch64-linux" [{ nixpkgs.buildPlatform = "x86_64-linux"; } mods.intermediate (relay { })];
  nixosTests = lib.filterAttrs (n: _: lib.hasPrefix "nixos-" n) self.checks.x86_64-linux;
  testNodes = lib.concatMapAttrs (t: drv: lib.mapAttrs' (n: v: lib.nameValuePair "${t}.${n}" v) drv.nodes) nixosTests;
  allHosts = alone // combined // self.nixosConfigurations // testNodes // { inherit privileged cross; };
  allUnits = lib.concatMapAttrs (h: v: lib.mapAttrs' (u: t: lib.nameValuePair "${h}: ${u}" t) (units v)) allHosts;
  daemonUnits = lib.filterAttrs (n: _: builtins.match ".*: ztna-(intermediate|connector|agent)" n != null) allUnits;

  checks = {
    modules-alone = ok (lib.mapAttrsToList (_: h: expect (units h != { }) "units") alone)
      "each of nixosModules.{${concatStringsSep "," (attrNames mods)}} evaluates alone: ${concatStringsSep "; " (lib.mapAttrsToList (n: h: "${n}: ${concatStringsSep " " (attrNames (units h))}") alone)}";

    modules-combined = ok
      (lib.mapAttrsToList (_: h: expect (units h ? ztna-intermediate || units h ? ztna-connector) "ZTNA units") combined)
      "combinations evaluate, each module imported once: ${concatStringsSep ", " (attrNames combined)}";

    nixos-configurations = ok
      (lib.mapAttrsToList
        (n: h: [
          (expect (h.config.nixpkgs.hostPlatform == hostsFile.${n}.system) "${n} runs ${hostsFile.${n}.system} (deploy/hosts.example.json)")
          (expect ((toplevel h).system == hostsFile.${n}.system) "${n}: system built for ${hostsFile.${n}.system}")
          (expect (self.deploy.nodes.${n}.profiles.system.path.system == hostsFile.${n}.system) "deploy.nodes.${n} activates with deploy-rs.lib.${hostsFile.${n}.system}")
          (expect (self.deploy.nodes.${n}.hostname == hostsFile.${n}.hostname) "deploy.nodes.${n}.hostname")
          (expect (any (u: lib.hasSuffix "-ready" u) (attrNames (units h))) "${n} has its readiness gate")
        ])
        self.nixosConfigurations
      ++ [
        (expect (attrNames self.deploy.nodes == attrNames self.nixosConfigurations) "one deploy node per host")
        (expect (attrNames (self.checks.x86_64-linux.deploy-schema.nodes) == [ "connector" ]) "x86_64 deploy checks cover the x86_64 host only")
        (expect (attrNames (self.checks.aarch64-linux.deploy-schema.nodes) == [ "intermediate-blue" "intermediate-green" ]) "aarch64 deploy checks cover the aarch64 hosts only")
      ])
      "nixosConfigurations ${concatStringsSep ", " (lib.mapAttrsToList (n: h: "${n} (${h.config.nixpkgs.hostPlatform}, ${toString (builtins.length (attrNames (units h)))} units)") self.nixosConfigurations)}; deploy.nodes per host system";

    nixos-tests = ok
      # (a NAT router's own units, firewall and nat, are not modelled by the stand-ins)
      (lib.mapAttrsToList (n: h: expect (units h != { } || h.config.networking.nat.enable) "${n}: units") testNodes
        # The test PKI is made when the test runs (by the driver), not in a cached derivation.
        ++ lib.mapAttrsToList (n: h: expect (!(hasInfix "pki" (builtins.toJSON h.config.system.activationScripts))) "${n}: no build-time PKI in the VM") testNodes
        ++ lib.mapAttrsToList (n: t: expect (hasInfix "/bin/ztna-pki\", *args" t.testScript) "${n}: the test script runs ztna-pki") nixosTests)
      "every node of ${concatStringsSep ", " (attrNames nixosTests)} evaluates: ${concatStringsSep " " (attrNames testNodes)}";

    # tests/nixos/p2p.nix: the direct path it asserts needs NAT routers that drop unsolicited
    # packets (the NixOS firewall; tests/system/p2p.py shows bare MASQUERADE failing), the agent
    # and the connector each behind its own router, and the backend reachable from the connector only.
    nixos-p2p =
      let
        n = lib.mapAttrs (_: h: h.config) self.checks.x86_64-linux.nixos-p2p.nodes;
        nodesOn = vlan: lib.sort lib.lessThan (attrNames (lib.filterAttrs (_: cfg: builtins.elem vlan cfg.virtualisation.vlans) n));
        addrs = cfg: i: map (a: a.address) cfg.networking.interfaces.${i}.ipv4.addresses;
        relayAddr = builtins.head (addrs n.relay "eth1");
        intermediatesOf = h: (configOf self.checks.x86_64-linux.nixos-p2p.nodes.${h} "ztna-${h}").intermediates;
      in
      ok
        [
          (expect (all (r: n.${r}.networking.nat.enable && n.${r}.networking.firewall.enable && n.${r}.networking.nat.externalInterface == "eth1" && n.${r}.networking.nat.internalInterfaces == [ "eth2" ]) [ "nata" "natc" ]) "nata and natc masquerade eth2 -> eth1 with the firewall on")
          (expect (nodesOn 1 == [ "nata" "natc" "relay" ] && nodesOn 2 == [ "agent" "nata" ] && nodesOn 3 == [ "connector" "natc" ] && nodesOn 4 == [ "backend" "connector" ]) "vlans: internet = relay + routers, one LAN per router, backend with the connector only")
          (expect (builtins.elem n.agent.networking.defaultGateway.address (addrs n.nata "eth2") && builtins.elem n.connector.networking.defaultGateway.address (addrs n.natc "eth2")) "agent and connector route through their own router's LAN address")
          (expect (n.relay.networking.defaultGateway == null && n.nata.networking.defaultGateway == null && n.natc.networking.defaultGateway == null && n.backend.networking.defaultGateway == null) "no other default routes")
          (expect (intermediatesOf "agent" == [ "${relayAddr}:4433" ] && intermediatesOf "connector" == [ "${relayAddr}:4433" ]) "agent and connector dial the relay's internet address ${relayAddr}")
        ]
        "nata/natc masquerade LAN -> internet with the NixOS firewall on; agent (vlan 2) and connector (vlan 3) route through them to the relay at ${relayAddr} (vlan 1); backend (vlan 4) shares a vlan with the connector only";

    # Defect 1: a port below 1024 needs the capability in the host's user namespace.
    privileged-port = ok
      (
        let
          u = (units privileged).ztna-intermediate;
          u4433 = (units alone.intermediate).ztna-intermediate;
        in
        [
          (expect (unitValue u "CapabilityBoundingSet" == "CAP_NET_BIND_SERVICE" && unitValue u "AmbientCapabilities" == "CAP_NET_BIND_SERVICE") "port 443: CAP_NET_BIND_SERVICE")
          (expect (unitValue u "PrivateUsers" == "false") "port 443: PrivateUsers=false (got ${toString (unitValue u "PrivateUsers")})")
          (expect (unitValue u4433 "PrivateUsers" == "true" && unitValue u4433 "CapabilityBoundingSet" == "") "port 4433: PrivateUsers=true, no capability")
          (expect (privileged.config.networking.firewall.allowedUDPPorts == [ 443 ]) "openFirewall opens UDP 443")
          (expect (let a = (units dnsAgent).ztna-agent; in unitValue a "AmbientCapabilities" == "CAP_NET_BIND_SERVICE" && unitValue a "PrivateUsers" == "false") "an agent forwarding 127.0.0.1:53: CAP_NET_BIND_SERVICE, PrivateUsers=false")
          (expect (let a = (units alone.agent).ztna-agent; in unitValue a "PrivateUsers" == "true" && unitValue a "CapabilityBoundingSet" == "") "an agent forwarding :8080: PrivateUsers=true, no capability")
          (expect (let c = (units (x86 [ mods.connector (connector { settings = { intermediates = [ "relay:4433" ]; service = [{ name = "web"; tcp = "127.0.0.1:8080"; }]; ops_listen = "0.0.0.0:443"; }; }) ])).ztna-connector; in unitValue c "AmbientCapabilities" == "CAP_NET_BIND_SERVICE") "a connector with ops_listen on :443: CAP_NET_BIND_SERVICE")
        ]
        ++ lib.mapAttrsToList
          (n: t: expect (lib.hasPrefix "CAP_" (toString (unitValue t "AmbientCapabilities")) -> unitValue t "PrivateUsers" == "false") "${n}: a capability together with PrivateUsers=true is useless")
          allUnits
      )
      "listen 0.0.0.0:443, an agent forward on :53 and a connector's ops_listen on :443 render CAP_NET_BIND_SERVICE with PrivateUsers=false; :4433 and :8080 PrivateUsers=true and no capability; no unit of ${toString (builtins.length (attrNames allUnits))} grants a capability inside a private user namespace";

    # nixos-rebuild switch: a change of the intermediate's policy alone reloads the unit (SIGHUP
    # applies it and keeps every connection); any other change restarts it (a drain). The unit
    # reads its config at a fixed /etc path, so the unit file changes only in its triggers.
    reload =
      let
        on = settings: x86 [ mods.default (relay { inherit settings; }) (connector { }) ];
        base = on { inherit policy; };
        morePolicy = on { policy = policy ++ [{ service = "db"; connectors = [ "spiffe://corp.example/connector/*" ]; agents = [ "spiffe://corp.example/agent/alice" ]; }]; };
        moreFlows = on { inherit policy; max_flows = 5000; };
        t = h: (toplevel h).triggers.ztna-intermediate;
        ids = map toString;
        connectorOf = settings: x86 [ mods.default (connector { inherit settings; }) ];
        c1 = connectorOf { intermediates = [ "relay:4433" ]; service = [{ name = "web"; tcp = "127.0.0.1:8080"; }]; };
        c2 = connectorOf { intermediates = [ "relay:4433" ]; service = [{ name = "web"; tcp = "127.0.0.1:8081"; }]; };
        ct = h: (toplevel h).triggers.ztna-connector;
      in
      ok
        [
          (expect (configFileOf (units base).ztna-intermediate == "/etc/ztna/intermediate.toml" && configFileOf (units base).ztna-connector == "/etc/ztna/connector.toml") "the units read /etc/ztna/<role>.toml")
          (expect ((units base).ztna-intermediate == (units morePolicy).ztna-intermediate) "a policy change leaves the unit text as it is (only its triggers differ)")
          (expect (builtins.length (configOf morePolicy "ztna-intermediate").policy == 2) "the new policy is in the /etc file")
          (expect (ids (t base).restartTriggers == ids (t morePolicy).restartTriggers && ids (t base).reloadTriggers != ids (t morePolicy).reloadTriggers) "a policy change alone: reload, not restart")
          (expect (ids (t base).restartTriggers != ids (t moreFlows).restartTriggers) "max_flows changed: restart")
          (expect ((ct c1).reloadTriggers == [ ] && ids (ct c1).restartTriggers != ids (ct c2).restartTriggers) "connector: nothing reloadable in its settings, a changed backend restarts it")
        ]
        "policy change: same unit text and restart trigger, new reload trigger (switch-to-configuration reloads); max_flows change: new restart trigger; connector: restart trigger only";

    units = ok
      (
        let
          h = x86 [ mods.default (relay { drainTimeout = 20; }) (connector { drainTimeout = 40; }) (agent { drainTimeout = 25; }) ];
          u = units h;
        in
        [
          (expect (unitValue u.ztna-intermediate "TimeoutStopSec" == "35" && unitValue u.ztna-connector "TimeoutStopSec" == "55" && unitValue u.ztna-agent "TimeoutStopSec" == "40") "TimeoutStopSec = drain + 15 on all three")
          (expect ((configOf h "ztna-agent").drain_timeout == "25s" && (configOf h "ztna-connector").drain_timeout == "40s" && (configOf h "ztna-intermediate").drain_timeout == "20s") "drain_timeout rendered for all three, the agent included")
          (expect ((configOf h "ztna-intermediate").ops_listen == "127.0.0.1:9470" && (configOf h "ztna-connector").ops_listen == "127.0.0.1:9471" && (configOf h "ztna-agent").ops_listen == "127.0.0.1:9472") "ops_listen defaults 9470/9471/9472")
          (expect ((configOf h "ztna-intermediate").tls == { ca = "/run/ztna-tls/intermediate/ca.pem"; cert = "/run/ztna-tls/intermediate/cert.pem"; key = "/run/ztna-tls/intermediate/key.pem"; }) "[tls] names the copies in /run/ztna-tls/<role>")
          (expect (unitValue u.ztna-connector "RuntimeDirectory" == "ztna-connector" && unitValue u.ztna-connector "RuntimeDirectoryMode" == "0700") "runtime directory /run/ztna-<role>, mode 0700")
          (expect (builtins.match ".*LoadCredential.*" u.ztna-agent == null) "no LoadCredential (its copies are not refreshed on reload)")
          (expect
            (
              let
                pkgs = flake.mkPkgs { system = "x86_64-linux"; };
                start = unitValues u.ztna-agent "ExecStartPre";
                reload = unitValues u.ztna-agent "ExecReload";
                copy = builtins.head start;
                has = needle: lib.hasInfix needle copy;
              in
              builtins.length start == 1
              && reload == [ copy "${pkgs.coreutils}/bin/kill -HUP $MAINPID" ]
              && lib.hasPrefix "+${pkgs.bash}/bin/bash -c '" copy
              && all has [
                "set -eu"
                "${pkgs.coreutils}/bin/stat -c %%g /run/ztna-agent"
                "-d -m 0750 -o root -g \"$$g\" /run/ztna-tls/agent"
                "-m 0440 -o root -g \"$$g\" \"/run/keys/ztna/key.pem\" /run/ztna-tls/agent/key.pem.new"
                "-m 0440 -o root -g \"$$g\" \"/run/keys/ztna/ca.pem\" /run/ztna-tls/agent/ca.pem.new"
                "${pkgs.coreutils}/bin/mv -f /run/ztna-tls/agent/key.pem.new /run/ztna-tls/agent/key.pem"
              ]
              # Every file is written before any is renamed into place.
              && lib.hasInfix "key.pem.new; ${pkgs.coreutils}/bin/mv -f /run/ztna-tls/agent/ca.pem.new" copy
              && unitValue u.ztna-agent "ExecStopPost" == "+${pkgs.coreutils}/bin/rm -rf /run/ztna-tls/agent"
            )
            "certificates and key copied by root (+) into root's /run/ztna-tls/<role> (0750, the service's group) before start and before the SIGHUP of each reload, all written then renamed; removed on stop")
          (expect (failedAssertions (x86 [ mods.default (agent { keyFile = "/run/keys/my key.pem"; }) ]) == [ "services.ztna.agent: caFile, certFile and keyFile may hold only letters, digits and . _ / @ : + = - (no spaces, quotes, $ or %)." ]) "a key path the copy step cannot quote is an assertion")
          (expect (h.config.boot.kernel.sysctl."net.core.rmem_max" == 16777216 && h.config.boot.kernel.sysctl."net.core.wmem_max" == 16777216) "UDP socket buffer maxima raised for the intermediate's 16 MiB buffers on a host with all three")
          (expect (let e = (x86 [ mods.default (connector { }) (agent { }) ]).config.boot.kernel.sysctl; in e."net.core.rmem_max" == 7500000 && e."net.core.wmem_max" == 7500000) "UDP socket buffer maxima raised for the 4 MiB buffers of agents and connectors")
          (expect ((x86 [ mods.default (relay { }) { boot.kernel.sysctl."net.core.rmem_max" = 33554432; } ]).config.boot.kernel.sysctl."net.core.rmem_max" == 33554432) "a higher rmem_max set elsewhere wins")
        ]
        ++ lib.mapAttrsToList
          (n: t: [
            (expect (unitValue t "LimitNOFILE" == "65536") "${n}: LimitNOFILE=65536")
            (expect (unitValue t "Type" == "notify" && unitValue t "Restart" == "always") "${n}: Type=notify, Restart=always")
          ])
          daemonUnits
      )
      "${toString (builtins.length (attrNames daemonUnits))} daemon units: LimitNOFILE=65536, Type=notify; TimeoutStopSec = drain + 15 and drain_timeout in the TOML for intermediate, connector and agent; ops ports 9470/9471/9472; net.core.{r,w}mem_max 16777216 with an intermediate, 7500000 without (a higher value elsewhere wins)";

    # Defect 2: promtool is in prometheus' `cli` output.
    promtool =
      let
        c = self.checks.x86_64-linux;
        runCommands = filter (d: (d.standIn or "") == "runCommand") (attrValues c ++ concatMap (h: h.config.system.checks) (attrValues allHosts));
        used = d: filter (t: hasInfix t d.buildCommand) [ "promtool" "nixpkgs-fmt" "deadnix" "ztna-intermediate" "ztna-connector" "ztna-agent" ];
      in
      ok
        ([
          (expect (builtins.elem "promtool" (binariesOf c.nextest.nativeCheckInputs) && builtins.elem "prometheus" (binariesOf c.nextest.nativeCheckInputs)) "checks.nextest has promtool and prometheus")
          (expect (builtins.elem "promtool" (binariesOf self.devShells.x86_64-linux.default.packages)) "the dev shell has promtool")
        ]
        ++ map (d: map (t: expect (builtins.elem t (binariesOf (d.nativeBuildInputs or [ ]))) "${d.name} runs ${t}, which its nativeBuildInputs provide") (used d)) runCommands)
        "every build-time script finds the programs it runs (${toString (builtins.length runCommands)} scripts, e.g. checks.alert-rules: promtool from prometheus.cli); nextest and the dev shell have promtool";

    store-binaries = ok
      (lib.mapAttrsToList storeBinaries allUnits
        ++ lib.mapAttrsToList (n: h: lib.mapAttrsToList (s: v: storeBinaries "${n}: ${s}.script" v.script) h.config.systemd.services) allHosts
        ++ lib.mapAttrsToList (n: t: storeBinaries n t.testScript) nixosTests
        ++ lib.mapAttrsToList (n: a: storeBinaries "apps.${n}" a.program) self.apps.x86_64-linux)
      "every /nix/store/…/bin/<program> in rendered units, service scripts, test scripts and apps exists in that package output";

    # Defect 7: the version comes from the workspace, and --locked stays.
    version = ok
      (lib.concatLists
        (map
          (s: lib.mapAttrsToList
            (n: p: [
              (expect (p.version == workspaceVersion) "packages.${s}.${n} has version ${workspaceVersion}, not ${p.version}")
              (expect (p ? cargoExtraArgs -> hasInfix "--locked" p.cargoExtraArgs) "packages.${s}.${n} builds with --locked (cargoExtraArgs: ${p.cargoExtraArgs or ""})")
              (expect (p ? cargoArtifacts -> hasInfix "--locked" p.cargoArtifacts.cargoExtraArgs) "packages.${s}.${n}: dependencies built with --locked")
            ])
            (lib.filterAttrs (n: _: builtins.elem n [ "ztna-intermediate" "ztna-connector" "ztna-agent" "ztna-pki" "ztna-demo" ]) self.packages.${s}))
          flake.systems)
      ++ [ (expect (self.packages.x86_64-linux.ztna-intermediate-image.tag == workspaceVersion) "image tag ${workspaceVersion}") ])
      "packages and image tags carry the workspace version ${workspaceVersion}; every crate builds with --locked";

    # A [patch.crates-io] crate is a dependency of registry crates (quinn needs quinn-proto): the
    # dependency build, in which crane replaces the sources of every crate it finds with dummies,
    # must get its real source back.
    patched-deps =
      let
        cargo = builtins.fromTOML (builtins.readFile (repo + "/Cargo.toml"));
        patched = lib.mapAttrsToList (_: d: d.path) (cargo.patch."crates-io" or { });
        script = self.packages.x86_64-linux.ztna-intermediate.cargoArtifacts.extraDummyScript or "";
      in
      ok
        ([ (expect (patched != [ ]) "Cargo.toml patches crates.io (vendor/quinn-proto, vendor/quinn)") ]
          ++ map
          (p: [
            (expect (builtins.pathExists (repo + "/${p}/Cargo.toml")) "${p}/Cargo.toml exists")
            (expect (hasInfix "$out/${p}\n" script) "the dependency build restores ${p} (extraDummyScript: ${script})")
            (expect (builtins.elem p (cargo.workspace.exclude or [ ])) "${p} is not a workspace member")
          ])
          patched)
        "the dependency build keeps the real source of ${toString patched} (Cargo.toml [patch.crates-io]), which is not a workspace member";

    completions =
      let
        native = self.packages.x86_64-linux;
        crossPkgs = self.packages.x86_64-linux.ztna-aarch64-cross.paths;
        documented = [ "ztna-intermediate" "ztna-connector" "ztna-agent" "ztna-pki" ];
        has = p: all (s: hasInfix s p.postInstall) [ "installShellCompletion --cmd ${p.pname}" "--bash <($out/bin/${p.pname} completions bash)" "--zsh" "--fish" "$out/bin/${p.pname} man > ${p.pname}.1" "installManPage ${p.pname}.1" ];
      in
      ok
        (map (n: expect (has native.${n} && builtins.elem "install-shell-files" (map (d: d.pname) native.${n}.nativeBuildInputs)) "${n}: completions and man page installed") documented
          ++ map (p: expect (p.postInstall == "") "cross-built ${p.pname} does not run itself") crossPkgs
          ++ map (p: expect (builtins.elem p.pname documented -> has p) "static ${p.pname} (runs on the build machine) has them") self.packages.x86_64-linux.ztna-static.paths
          ++ [ (expect (native.ztna-demo.postInstall == "") "the demo has no completions") ])
        "postInstall installs bash/zsh/fish completions and a man page for ${concatStringsSep ", " documented} (native and static); cross builds skip it";

    # Defect 8: the config is checked by the build platform's binary.
    cross-build = ok
      (
        let
          cfg = cross.config.services.ztna.intermediate;
          check = builtins.head cross.config.system.checks;
        in
        [
          (expect (cfg.package.system == "aarch64-linux") "the service runs the aarch64 binary")
          (expect (cfg.configCheckPackage.system == "x86_64-linux") "the config check uses the x86_64 (build) binary")
          (expect (map (d: d.outPath) check.nativeBuildInputs == [ cfg.configCheckPackage.outPath ] && hasInfix "ztna-intermediate --config" check.buildCommand) "system.checks runs ztna-intermediate --check-config with it")
          (expect (hasInfix cfg.package.outPath (units cross).ztna-intermediate) "ExecStart uses the aarch64 package")
        ]
      )
      "a system built for aarch64-linux on x86_64-linux checks its config with the x86_64 binary and runs the aarch64 one";

    # Defect 4: Grafana's secret_key.
    grafana = ok
      [
        (expect (alone.monitoring.config.services.grafana.settings.security.secret_key == "$__file{/run/keys/grafana-secret-key}") "secret_key from the file provider")
        (expect
          (failedAssertions (x86 [ mods.monitoring (monitoring { grafana.secretKeyFile = null; }) ]) == [
            "services.ztna.monitoring.grafana.secretKeyFile must be set: Grafana needs a secret_key (a file outside the Nix store)."
            "Grafana's secret key (services.grafana.settings.security.secret_key) doesn't have a default value anymore."
          ]) "without secretKeyFile our assertion says what to set")
        (expect (failedAssertions (x86 [ mods.monitoring (monitoring { grafana.secretKeyFile = "/nix/store/00000000000000000000000000000000-key"; }) ]) == [ "services.ztna.monitoring.grafana.secretKeyFile must be an absolute path outside the Nix store." ]) "a store path is refused")
        (expect ((units alone.monitoring) ? prometheus && (units alone.monitoring) ? grafana) "Prometheus and Grafana units")
      ]
      "monitoring sets services.grafana.settings.security.secret_key = \"$__file{<secretKeyFile>}\" and asserts it is given, outside the store";

    # Ops ports: no clash with Prometheus; openOpsFirewall.
    ops-ports = ok
      [
        (expect (failedAssertions alone.default == [ ]) "intermediate, connector, agent and Prometheus on one host with default ports")
        (expect
          (failedAssertions (x86 [ mods.default (relay { settings.ops_listen = "127.0.0.1:9090"; settings.policy = policy; }) (monitoring { }) ]) == [
            "services.ztna.intermediate.settings.ops_listen uses port 9090, which Prometheus (services.prometheus.port) listens on on this host; pick another port."
          ]) "ops_listen on Prometheus' port is refused")
        (expect ((x86 [ mods.connector (connector { openOpsFirewall = true; settings.ops_listen = "0.0.0.0:9471"; settings.intermediates = [ "relay:4433" ]; settings.service = [{ name = "web"; tcp = "127.0.0.1:8080"; }]; }) ]).config.networking.firewall.allowedTCPPorts == [ 9471 ]) "openOpsFirewall opens the ops TCP port")
        (expect (alone.connector.config.networking.firewall.allowedTCPPorts == [ ]) "closed by default")
        (expect (lib.any (hasInfix "is a loopback address") (failedAssertions (x86 [ mods.agent (agent { openOpsFirewall = true; }) ]))) "openOpsFirewall with a loopback ops_listen is refused")
      ]
      "defaults 9470/9471/9472 do not clash with Prometheus (9090) and the Pushgateway (9091); a clash and a useless openOpsFirewall are assertions";

    assertions = ok
      [
        (expect
          (failedAssertions (x86 [ mods.connector { services.ztna.connector = secrets // { enable = true; keyFile = "/nix/store/22222222222222222222222222222222-key.pem"; settings.intermediates = [ ]; settings.service = [{ name = "web"; }]; }; } ]) == [
            "services.ztna.connector.keyFile is in the Nix store, which is world-readable; keep keys outside it."
            "services.ztna.connector.settings.intermediates must list at least one intermediate."
            "services.ztna.connector.settings.service: every service needs a tcp and/or udp backend."
          ]) "connector assertions")
        (expect
          (failedAssertions (x86 [ mods.intermediate { services.ztna.intermediate = secrets // { enable = true; }; } ]) == [
            "services.ztna.intermediate.settings.policy is empty: every registration and flow would be denied."
          ]) "intermediate assertion")
        (expect (!(builtins.tryEval (toplevel (x86 [ mods.intermediate { services.ztna.intermediate = secrets // { enable = true; }; } ]))).success) "a failed assertion fails the system build")
        (expect
          (failedAssertions (x86 [ mods.intermediate (relay { settings = { inherit policy; drain_timeout = "5m"; }; }) ]) == [
            "services.ztna.intermediate: set drainTimeout (seconds; now 30) rather than settings.drain_timeout (5m): the unit's TimeoutStopSec follows drainTimeout, and systemd would kill a longer drain."
          ]) "settings.drain_timeout apart from drainTimeout")
      ]
      "impossible combinations fail with their message";

    deploy-rs = ok
      [
        (expect (self.apps.x86_64-linux.deploy-rs.program == "${flake.deploy-rs.packages.x86_64-linux.deploy-rs}/bin/deploy") "apps.deploy-rs is flake.lock's deploy-rs")
      ]
      "nix run .#deploy-rs runs the deploy-rs pinned in flake.lock";

    outputs =
      let
        forced = lib.mapAttrs (_: lib.mapAttrs (_: lib.mapAttrs (_: d: d.outPath))) (builtins.removeAttrs self [ "outPath" "nixosModules" "nixosConfigurations" "deploy" "apps" ]);
      in
      ok [ (expect (forced != { }) "outputs") ]
        "${concatStringsSep "; " (lib.mapAttrsToList (o: v: "${o}: ${concatStringsSep " " (lib.unique (concatMap attrNames (attrValues v)))}") forced)}";
  };
in
{
  inherit checks;
  names = attrNames checks;
  testScripts = mapAttrs (_: t: t.testScript) nixosTests;
  apps = mapAttrs (_: a: attrNames a) self.apps;

  # The readiness gates of the deployed hosts, as rendered (for run.sh to run one).
  readyGates = lib.concatMapAttrs (n: h: lib.mapAttrs' (s: v: lib.nameValuePair "${n}/${s}" v.script) (lib.filterAttrs (s: _: lib.hasSuffix "-ready" s) h.config.systemd.services)) self.nixosConfigurations;

  # tests/system/systemd.sh: the units (and the config files they name) of one host that enables
  # the three daemons through the flake's nixosModules.default, rendered by the real renderer, with
  # the binaries in /usr/local/bin and kill from /usr/bin (coreutils), as the container has them.
  systemdSuite =
    let
      local = import ./stand-ins/inputs.nix {
        inherit libPath subset repo;
        hostPaths = {
          coreutils = "/usr";
          bash = "/usr";
          ztna-intermediate = "/usr/local";
          ztna-connector = "/usr/local";
          ztna-agent = "/usr/local";
        };
      };
      creds = role: {
        caFile = "/etc/ztna/creds/${role}/ca.pem";
        certFile = "/etc/ztna/creds/${role}/cert.pem";
        keyFile = "/etc/ztna/creds/${role}/key.pem";
        drainTimeout = 5;
        watchdogSec = 3;
        enable = true;
      };
      h = local.nixos.nixosSystem {
        modules = [
          { nixpkgs.hostPlatform = "x86_64-linux"; }
          local.self.nixosModules.default
          {
            services.ztna.intermediate = creds "intermediate" // {
              settings = {
                listen = relayListen;
                ops_listen = "127.0.0.1:29470";
                policy = [{ service = "web"; connectors = [ "spiffe://systemd.test/connector/*" ]; agents = [ "spiffe://systemd.test/agent/*" ]; }];
              };
            };
            services.ztna.connector = creds "connector" // {
              settings = {
                intermediates = [ relayListen ];
                ops_listen = "127.0.0.1:29471";
                service = [{ name = "web"; tcp = "127.0.0.1:27000"; udp = "127.0.0.1:27001"; }];
              };
            };
            services.ztna.agent = creds "agent" // {
              settings = {
                intermediates = [ relayListen ];
                ops_listen = "127.0.0.1:29472";
                forward = [
                  { service = "web"; protocol = "tcp"; listen = "127.0.0.1:28080"; }
                  { service = "web"; protocol = "udp"; listen = "127.0.0.1:28081"; }
                ];
              };
            };
          }
        ];
      };
      u = lib.filterAttrs (n: _: lib.hasPrefix "ztna-" n) (units h);
    in
    {
      units = lib.mapAttrs' (n: t: lib.nameValuePair "${n}.service" t) u;
      files = lib.mapAttrs' (n: t: lib.nameValuePair (configFileOf t) (configTextOf h n)) u;
    };
}
